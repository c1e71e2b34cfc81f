"""Paired statistics that say when two methods can be told apart (every statistic from scipy.stats).

Runs of one seed share the dense checkpoint, the data split and the test set, so results pair:

- **two runs on the same test set** (`pair_runs`): the exact McNemar test on the discordant
  samples (`scipy.stats.binomtest` of "A right, B wrong" against "A wrong, B right") and a
  paired bootstrap interval of the top-1 difference (`scipy.stats.bootstrap`, paired=True,
  percentile, fixed seed). Two records pair only when their `PerSample.test_set` identities
  agree; otherwise `Unpairable` says why in one line. This measures the test-set sampling
  noise of two trained models, not the training noise across seeds.
- **two methods over seeds** (`over_seeds`): the per-seed differences (same model, dataset,
  target, device and seed), their mean with the 95 % t-interval and t-test p-value
  (`scipy.stats.ttest_1samp`), and the sign-flip permutation p-value
  (`scipy.stats.permutation_test`, permutation_type="samples": exact over all 2^n sign
  flips up to 13 seeds). With n seeds the smallest two-sided sign-flip p is 2/2^n (0.25 at 3
  seeds, 0.0625 at 5): only from 6 seeds can it fall below 0.05.
- **seeds needed** (`seeds_needed`): the smallest number of seeds whose paired t-test
  resolves a given difference (1 point by default) at 80 % power, from the observed standard
  deviation of the per-seed differences (noncentral t, `scipy.stats.nct`).
- **ties** (`compare_runs`, `holm`): the decision between two rows uses the paired t-test
  over seeds when at least two seeds pair, else McNemar on the one pair with per-sample
  results, else nothing ("unpaired"); comparisons against a table's best are Holm-corrected.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from scipy import stats

from sparsebench.store.record import PerSample, RunRecord


def as_float(v) -> Optional[float]:
    """A number, or None for a missing, NaN or non-numeric value."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


ALPHA = 0.05
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000
EXACT_SIGN_FLIPS = 13               # up to 2^13 sign patterns enumerated; beyond, 9999 random ones
RESOLVE_POINTS = 1.0                # the difference `seeds_needed` is asked to resolve
POWER = 0.8


class Unpairable(ValueError):
    """Two runs that cannot be compared sample by sample; the message says why in one line."""


def _r(x: Optional[float], digits: int = 4) -> Optional[float]:
    """A plain, rounded float for JSON; None for a missing or NaN value."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else round(x, digits)


def _rp(p: Optional[float]) -> Optional[float]:
    """A p-value for JSON: four significant digits (a tiny p keeps its size)."""
    if p is None or math.isnan(float(p)):
        return None
    return float(f"{float(p):.4g}")


# --- two runs on the same test set ----------------------------------------------------------------
def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value: under no difference each discordant sample is A's or B's
    with probability 1/2. 1.0 without discordant samples."""
    n = a_only + b_only
    return 1.0 if n == 0 else float(stats.binomtest(a_only, n, 0.5).pvalue)


def bootstrap_difference(a, b, confidence: float = CONFIDENCE, resamples: int = BOOTSTRAP_RESAMPLES,
                         seed: int = 0) -> Tuple[float, float]:
    """Paired bootstrap percentile interval of mean(a) - mean(b), in points (x100), resampling samples."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if np.array_equal(a, b):                  # every resample gives 0: no need to draw them
        return 0.0, 0.0

    def difference(x, y, axis=-1):
        return 100.0 * (x.mean(axis=axis) - y.mean(axis=axis))

    res = stats.bootstrap((a, b), difference, paired=True, vectorized=True, n_resamples=resamples,
                          confidence_level=confidence, method="percentile", batch=100,
                          rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


@dataclass(frozen=True)
class RunPair:
    """A against B on one test set: difference in top-1 points with its bootstrap interval, the
    discordant counts and McNemar's exact p-value."""

    n: int
    a_only: int                       # samples A got right and B wrong
    b_only: int                       # samples B got right and A wrong
    difference: float                 # top-1 points, A - B
    low: float
    high: float
    p_mcnemar: float

    def to_dict(self) -> Dict[str, object]:
        d = asdict(self)
        return {k: (_rp(v) if k == "p_mcnemar" else _r(v)) if isinstance(v, float) else v for k, v in d.items()}


def pairing_problem(a: RunRecord, b: RunRecord) -> Optional[str]:
    """None when the two runs can be paired sample by sample, else why not (one line)."""
    for r in (a, b):
        if r.per_sample is None:
            return f"run {r.run_id} has no per-sample results (recorded before they were kept)"
    return a.per_sample.unpairable_with(b.per_sample)


def pair_samples(a: PerSample, b: PerSample, seed: int = 0, interval: bool = True) -> RunPair:
    """McNemar and the bootstrap interval (NaN without `interval`) for two per-sample results;
    `Unpairable` if their test sets differ."""
    reason = a.unpairable_with(b)
    if reason:
        raise Unpairable(reason)
    x, y = a.vector(), b.vector()
    a_only, b_only = int((x & ~y).sum()), int((~x & y).sum())
    low, high = bootstrap_difference(x, y, seed=seed) if interval else (float("nan"), float("nan"))
    return RunPair(n=int(x.size), a_only=a_only, b_only=b_only, difference=100.0 * (x.mean() - y.mean()),
                   low=low, high=high, p_mcnemar=mcnemar_exact(a_only, b_only))


def pair_runs(a: RunRecord, b: RunRecord, seed: int = 0) -> RunPair:
    """`pair_samples` of two records; `Unpairable` (one line) when either lacks per-sample results
    or they saw different test sets."""
    reason = pairing_problem(a, b)
    if reason:
        raise Unpairable(reason)
    return pair_samples(a.per_sample, b.per_sample, seed)


# --- two methods over seeds -----------------------------------------------------------------------
def seeds_needed(sd: float, difference: float = RESOLVE_POINTS, power: float = POWER, alpha: float = ALPHA,
                 most: int = 100_000) -> Optional[int]:
    """Seeds a two-sided paired t-test needs to detect `difference` with `power`, when per-seed
    differences have standard deviation `sd`. None when `sd` is unknown (fewer than two pairs)
    or more than `most` seeds would be needed."""
    if sd is None or math.isnan(sd):
        return None
    if sd == 0:
        return 2

    def powered(n: int) -> bool:
        df = n - 1
        t_crit = stats.t.ppf(1 - alpha / 2, df)
        shift = difference / (sd / math.sqrt(n))
        wrong_side = stats.nct.cdf(-t_crit, df, shift)        # NaN where it underflows far below 1e-300
        return stats.nct.sf(t_crit, df, shift) + (0.0 if math.isnan(wrong_side) else wrong_side) >= power

    # power grows with n: bracket from the normal approximation (never more than the t-test needs), bisect
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    low = max(1, int((z * sd / difference) ** 2) - 1)      # low < n_needed (n = 1 has no test)
    if low >= most or not powered(most):
        return None
    high = min(most, max(2, 2 * low))
    while not powered(high):
        low, high = high, min(most, 2 * high)
    while high - low > 1:
        mid = (low + high) // 2
        low, high = (low, mid) if powered(mid) else (mid, high)
    return high


def sign_flip_p(differences: Sequence[float], seed: int = 0) -> float:
    """Two-sided sign-flip permutation p-value of the mean difference (exact up to 13 values)."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2 or not np.any(d):       # one value: both of its signs are as extreme as it
        return 1.0
    exact = len(d) <= EXACT_SIGN_FLIPS
    res = stats.permutation_test((d,), lambda x, axis: np.mean(x, axis=axis), permutation_type="samples",
                                 vectorized=True, n_resamples=2 ** len(d) if exact else 9999,
                                 alternative="two-sided", rng=np.random.default_rng(seed))
    return float(res.pvalue)


@dataclass(frozen=True)
class SeedDifference:
    """Per-seed paired differences A - B (top-1 points) and what they say together."""

    seeds: List[int]
    differences: List[float]
    mean: float
    low: float                        # 95 % t-interval (NaN with one pair)
    high: float
    sd: float
    p_t: float                        # paired t-test (NaN with one pair)
    p_sign_flip: float
    seeds_needed: Optional[int]       # to resolve RESOLVE_POINTS at POWER

    @property
    def pairs(self) -> int:
        return len(self.differences)

    def to_dict(self) -> Dict[str, object]:
        return {"pairs": self.pairs, "seeds": list(self.seeds), "differences": [_r(d) for d in self.differences],
                "mean": _r(self.mean), "low": _r(self.low), "high": _r(self.high), "sd": _r(self.sd),
                "p_t": _rp(self.p_t), "p_sign_flip": _rp(self.p_sign_flip), "seeds_needed": self.seeds_needed,
                "seeds_needed_for": RESOLVE_POINTS}


def over_seeds(seeds: Sequence[int], differences: Sequence[float], with_permutation: bool = True) -> SeedDifference:
    """The mean of per-seed differences, its 95 % t-interval, t and sign-flip p-values, seeds needed."""
    d = np.asarray(differences, dtype=float)
    n = len(d)
    mean = float(d.mean()) if n else float("nan")
    nan = float("nan")
    if n < 2:
        low = high = sd = p_t = nan
    else:
        sd = float(d.std(ddof=1))
        if sd == 0:                   # every seed the same difference: t is infinite (or 0/0)
            low = high = mean
            p_t = 1.0 if mean == 0 else 0.0
        else:
            res = stats.ttest_1samp(d, 0.0)
            ci = res.confidence_interval(CONFIDENCE)
            low, high, p_t = float(ci.low), float(ci.high), float(res.pvalue)
    return SeedDifference(seeds=[int(s) for s in seeds], differences=[float(x) for x in d], mean=mean, low=low,
                          high=high, sd=sd, p_t=p_t, p_sign_flip=sign_flip_p(d) if with_permutation and n else nan,
                          seeds_needed=seeds_needed(sd) if n >= 2 else None)


# --- two rows of a table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedRun:
    """What a comparison needs of one run: its top-1 (points) and its per-sample results, if kept."""

    top1: float
    per_sample: Optional[PerSample] = None
    run_id: str = ""


@dataclass
class Comparison:
    """A against B over the seeds both have. `p_value` decides ties: the paired t-test with at
    least two pairs; McNemar's with one pair that has per-sample results; None otherwise."""

    seed_level: SeedDifference
    per_seed: Dict[int, object] = field(default_factory=dict)     # seed -> RunPair, or the reason it has none
    p_value: Optional[float] = None
    basis: str = "unpaired"

    @property
    def pairs(self) -> int:
        return self.seed_level.pairs

    def to_dict(self) -> Dict[str, object]:
        return {**self.seed_level.to_dict(), "p_value": _rp(self.p_value), "basis": self.basis,
                "per_seed": {str(s): (p.to_dict() if isinstance(p, RunPair) else {"unpaired": p})
                             for s, p in sorted(self.per_seed.items())}}


def compare_runs(a: Mapping[int, SeedRun], b: Mapping[int, SeedRun], per_sample: str = "single",
                 with_permutation: bool = True, interval: bool = True) -> Comparison:
    """A against B, pairing runs by seed. `per_sample`: "all" pairs every seed sample by sample
    (McNemar, bootstrap), "single" only when exactly one seed pairs (the only test then), "none" never.
    `interval`: draw the bootstrap intervals (ranking needs only McNemar's p)."""
    seeds = sorted(set(a) & set(b))
    level = over_seeds(seeds, [a[s].top1 - b[s].top1 for s in seeds], with_permutation)
    per_seed: Dict[int, object] = {}
    if per_sample == "all" or (per_sample == "single" and len(seeds) == 1):
        for s in seeds:
            x, y = a[s], b[s]
            if x.per_sample is None or y.per_sample is None:
                missing = x if x.per_sample is None else y
                per_seed[s] = f"run {missing.run_id or '?'} has no per-sample results (recorded before they were kept)"
                continue
            try:
                per_seed[s] = pair_samples(x.per_sample, y.per_sample, seed=s, interval=interval)
            except Unpairable as e:
                per_seed[s] = str(e)
    comparison = Comparison(level, per_seed)
    if level.pairs >= 2:
        comparison.p_value, comparison.basis = level.p_t, f"paired t over {level.pairs} seeds"
    elif level.pairs == 1 and isinstance(per_seed.get(seeds[0]), RunPair):
        comparison.p_value, comparison.basis = per_seed[seeds[0]].p_mcnemar, "McNemar, 1 seed"
    return comparison


def holm(pvalues: Sequence[float]) -> List[float]:
    """Holm-adjusted p-values (step-down; monotone; capped at 1), in the input order."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        adjusted[k] = running
    return adjusted.tolist()


@dataclass(frozen=True)
class Rank:
    label: str                        # "1", "1=", "3", "4 (unpaired)"
    p_adjusted: Optional[float]       # Holm-adjusted p against the best row
    basis: str                        # how the row was compared with the best
    pairs: int
    seeds_needed: Optional[int]       # seeds to resolve RESOLVE_POINTS against the best


def rank_rows(means: Sequence[float], runs: Sequence[Mapping[int, SeedRun]], alpha: float = ALPHA) -> List[Rank]:
    """Ranks of a table's rows by mean (highest first), grouping with the best every row not
    distinguishable from it at `alpha` after Holm's correction over the comparisons against the
    best. A row that cannot be paired with the best keeps its place by mean, marked unpaired."""
    order = sorted(range(len(means)), key=lambda i: -means[i])
    if not order:
        return []
    best = order[0]
    comparisons = {i: compare_runs(runs[best], runs[i], with_permutation=False, interval=False) for i in order[1:]}
    tested = [i for i in order[1:] if comparisons[i].p_value is not None]
    adjusted = dict(zip(tested, holm([comparisons[i].p_value for i in tested])))
    ranks: Dict[int, Rank] = {best: Rank("1", None, "best", 0, None)}
    for position, i in enumerate(order[1:], start=2):
        c = comparisons[i]
        if i not in adjusted:
            label = f"{position} (unpaired)"
        else:
            label = "1=" if adjusted[i] >= alpha else str(position)
        ranks[i] = Rank(label, adjusted.get(i), c.basis, c.pairs, c.seed_level.seeds_needed)
    return [ranks[i] for i in range(len(means))]

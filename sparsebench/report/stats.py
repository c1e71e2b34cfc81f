"""Paired statistics that say when two methods can be told apart (tests and distributions from scipy.stats).

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
  seeds, 0.0625 at 5): only from 6 seeds can it fall below 0.05. Identical non-zero
  differences leave the t-test undefined (no spread); their p is the sign-flip's 2/2^n, never 0.
- **seeds and test images together** (`two_level`): every seed is scored on the same test set,
  so the test set's sampling noise is shared by all seeds and does not average out over them;
  a seed-level interval leaves it out. The per-image differences form a crossed seeds × images
  array, and the variance of its mean is σ²_seed/n + σ²_image/m + σ²_residual/(n m) (two-way
  random-effects model; `crossed_components`: method-of-moments estimates from the ANOVA mean
  squares, clamped at zero, so the result is never below the seed-level variance). The interval
  is mean ± t(n − 1) × its square root, and its p-value the t-test on it. Not a bootstrap: with
  the images shared (crossed, not nested), a bootstrap that redraws images per seed treats the
  test set as redrawn each seed, and one that resamples seeds and images together counts the
  seed × image term more than once (McCullagh 2000); with five seeds a percentile bootstrap over
  seeds is also about 37 % narrower than the t-interval (it divides by n, not n − 1). The
  moments need no random draws, so the same records give the same interval.
- **seeds needed** (`seeds_needed`): the smallest number of seeds whose paired t-test
  resolves a given difference (1 point by default) at 80 % power, from the observed standard
  deviation of the per-seed differences (noncentral t, `scipy.stats.nct`).
- **decisions** (`compare_runs`, `holm`, `rank_rows`): the decision between two rows uses the
  two-level t-test when at least two seeds pair and all have per-sample results on one test
  set, else the seed-level t-test (the sign-flip p where the t-test is undefined), else, with a
  single pair, McNemar on its per-sample results (test-set noise only: `single_seed`), else
  nothing ("unpaired"). A table's rows are ranked by all pairwise comparisons, Holm-corrected
  together: rank = 1 + the number of rows significantly better.
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
SAME = 1e-9                         # relative spread below which per-seed differences are one value (float rounding)


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
    p_t: float                        # paired t-test (NaN with one pair, or identical non-zero differences)
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
        if sd <= SAME * max(1.0, abs(mean)):     # every seed the same difference (to rounding: top-1s are floats):
            sd, low, high = 0.0, mean, mean       # t is 0/0 or infinite, the t-test undefined
            p_t = 1.0 if mean == 0 else nan
        else:
            res = stats.ttest_1samp(d, 0.0)
            ci = res.confidence_interval(CONFIDENCE)
            low, high, p_t = float(ci.low), float(ci.high), float(res.pvalue)
    return SeedDifference(seeds=[int(s) for s in seeds], differences=[float(x) for x in d], mean=mean, low=low,
                          high=high, sd=sd, p_t=p_t, p_sign_flip=sign_flip_p(d) if with_permutation and n else nan,
                          seeds_needed=seeds_needed(sd) if n >= 2 else None)


# --- seeds and test images together ---------------------------------------------------------------
@dataclass(frozen=True)
class VarianceComponents:
    """The crossed random-effects decomposition of a seeds × test-images array of differences:
    seed (training noise), image (which images the test set drew) and residual (seed × image)
    variances, method-of-moments estimates clamped at zero, in points²."""

    seeds: int
    images: int
    seed: float
    image: float
    residual: float

    @property
    def variance_of_mean(self) -> float:
        """Variance of the grand mean: σ²_seed / n + σ²_image / m + σ²_residual / (n m)."""
        n, m = self.seeds, self.images
        return self.seed / n + self.image / m + self.residual / (n * m)


def crossed_components(differences) -> VarianceComponents:
    """`VarianceComponents` of an (n seeds × m images) array by the two-way ANOVA mean squares:
    E[MS_seed] = m σ²_seed + σ²_res, E[MS_image] = n σ²_image + σ²_res, E[MS_res] = σ²_res."""
    d = np.asarray(differences, dtype=float)
    n, m = d.shape
    grand = d.mean()
    by_seed, by_image = d.mean(axis=1), d.mean(axis=0)
    ms_seed = m * float(((by_seed - grand) ** 2).sum()) / (n - 1)
    ms_image = n * float(((by_image - grand) ** 2).sum()) / (m - 1) if m > 1 else 0.0
    residual = d - by_seed[:, None] - by_image[None, :] + grand
    ms_residual = float((residual ** 2).sum()) / ((n - 1) * (m - 1)) if m > 1 else 0.0
    return VarianceComponents(n, m, seed=max(0.0, (ms_seed - ms_residual) / m),
                              image=max(0.0, (ms_image - ms_residual) / n), residual=ms_residual)


@dataclass(frozen=True)
class TwoLevel:
    """The mean per-seed difference A - B (top-1 points) with an interval that includes the test
    set's sampling noise (module docstring), and the seed-level standard error beside it."""

    mean: float
    low: float
    high: float
    se: float                         # sqrt(VarianceComponents.variance_of_mean)
    se_seeds: float                   # s / sqrt(n): the seed-level t-interval's
    p: float                          # t-test of mean / se, n - 1 degrees of freedom
    pairs: int
    images: int
    components: VarianceComponents

    def to_dict(self) -> Dict[str, object]:
        c = self.components
        return {"mean": _r(self.mean), "low": _r(self.low), "high": _r(self.high), "se": _r(self.se),
                "se_seeds": _r(self.se_seeds), "p": _rp(self.p), "pairs": self.pairs, "images": self.images,
                "variance": {"seed": _r(c.seed, 6), "image": _r(c.image, 6), "residual": _r(c.residual, 6)}}


def two_level(a: Sequence[PerSample], b: Sequence[PerSample], confidence: float = CONFIDENCE) -> TwoLevel:
    """The two-level interval of A - B from each seed's per-sample results of A and B (same seed
    order). `Unpairable` unless every one of them saw the same test set: only then is the test set
    one draw shared by every seed, whose noise the seed-level interval leaves out."""
    n = len(a)
    if n < 2 or len(b) != n:
        raise Unpairable(f"a two-level interval needs two or more seeds with per-sample results, got {n}")
    for ps in (*a, *b):
        reason = a[0].unpairable_with(ps)
        if reason:
            raise Unpairable(f"seeds saw {reason}: the seed-level interval already samples the test set")
    d = 100.0 * np.array([x.vector().astype(float) - y.vector().astype(float) for x, y in zip(a, b)])
    components = crossed_components(d)
    mean = float(d.mean())
    se_seeds = float(d.mean(axis=1).std(ddof=1) / math.sqrt(n))
    se = math.sqrt(components.variance_of_mean)
    if se == 0:                         # the same predictions everywhere: no difference, no noise
        return TwoLevel(mean, mean, mean, 0.0, se_seeds, 1.0 if mean == 0 else float("nan"), n, d.shape[1], components)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    p = float(2 * stats.t.sf(abs(mean) / se, n - 1))
    return TwoLevel(mean, mean - half, mean + half, se, se_seeds, p, n, int(d.shape[1]), components)


# --- two rows of a table ----------------------------------------------------------------------------
@dataclass(frozen=True)
class SeedRun:
    """What a comparison needs of one run: its top-1 (points) and its per-sample results, if kept."""

    top1: float
    per_sample: Optional[PerSample] = None
    run_id: str = ""


SINGLE_SEED = "McNemar, 1 seed (test-set noise only)"


@dataclass
class Comparison:
    """A against B over the seeds both have. `p_value` decides: the two-level t-test (seeds and
    test images) with at least two pairs that all kept per-sample results on one test set, else
    the seed-level t-test, or its sign-flip p where the t-test is undefined (identical non-zero
    differences); McNemar's with one pair that has per-sample results (`single_seed`: test-set
    noise only); None otherwise. `low`/`high`: the interval of the same basis (two-level, else
    seed-level); `test_noise` says whether it includes the test set's sampling noise, and
    `interval_note` why not where it does not."""

    seed_level: SeedDifference
    per_seed: Dict[int, object] = field(default_factory=dict)     # seed -> RunPair, or the reason it has none
    p_value: Optional[float] = None
    basis: str = "unpaired"
    two_level: Optional[TwoLevel] = None
    interval_note: str = ""

    @property
    def pairs(self) -> int:
        return self.seed_level.pairs

    @property
    def single_seed(self) -> bool:
        """Decided by one seed's test samples alone: says nothing about training noise."""
        return self.basis == SINGLE_SEED

    @property
    def test_noise(self) -> bool:
        return self.two_level is not None

    @property
    def low(self) -> float:
        return self.two_level.low if self.two_level is not None else self.seed_level.low

    @property
    def high(self) -> float:
        return self.two_level.high if self.two_level is not None else self.seed_level.high

    def to_dict(self) -> Dict[str, object]:
        return {**self.seed_level.to_dict(), "p_value": _rp(self.p_value), "basis": self.basis,
                "two_level": None if self.two_level is None else self.two_level.to_dict(),
                "interval_note": self.interval_note,
                "per_seed": {str(s): (p.to_dict() if isinstance(p, RunPair) else {"unpaired": p})
                             for s, p in sorted(self.per_seed.items())}}


def _missing_per_sample(x: SeedRun, y: SeedRun) -> Optional[str]:
    if x.per_sample is None or y.per_sample is None:
        missing = x if x.per_sample is None else y
        return f"run {missing.run_id or '?'} has no per-sample results (recorded before they were kept)"
    return None


def compare_runs(a: Mapping[int, SeedRun], b: Mapping[int, SeedRun], per_sample: str = "single",
                 with_permutation: bool = True, interval: bool = True, test_noise: bool = True) -> Comparison:
    """A against B, pairing runs by seed. `per_sample`: "all" pairs every seed sample by sample
    (McNemar, bootstrap), "single" only when exactly one seed pairs (the only test then), "none" never.
    `interval`: draw the per-seed bootstrap intervals (ranking needs only McNemar's p).
    `test_noise`: the two-level interval and test where two or more seeds pair (`two_level`)."""
    seeds = sorted(set(a) & set(b))
    level = over_seeds(seeds, [a[s].top1 - b[s].top1 for s in seeds], with_permutation)
    per_seed: Dict[int, object] = {}
    if per_sample == "all" or (per_sample == "single" and len(seeds) == 1):
        for s in seeds:
            x, y = a[s], b[s]
            missing = _missing_per_sample(x, y)
            if missing:
                per_seed[s] = missing
                continue
            try:
                per_seed[s] = pair_samples(x.per_sample, y.per_sample, seed=s, interval=interval)
            except Unpairable as e:
                per_seed[s] = str(e)
    comparison = Comparison(level, per_seed)
    if level.pairs >= 2:
        if test_noise:
            missing = next(filter(None, (_missing_per_sample(a[s], b[s]) for s in seeds)), None)
            if missing:
                comparison.interval_note = missing
            else:
                try:
                    comparison.two_level = two_level([a[s].per_sample for s in seeds],
                                                     [b[s].per_sample for s in seeds])
                except Unpairable as e:
                    comparison.interval_note = str(e)
        if comparison.two_level is not None and not math.isnan(comparison.two_level.p):
            comparison.p_value = comparison.two_level.p
            comparison.basis = f"paired t over {level.pairs} seeds and {comparison.two_level.images} test images"
        elif not math.isnan(level.p_t):
            comparison.p_value, comparison.basis = level.p_t, f"paired t over {level.pairs} seeds"
        else:                           # identical non-zero differences: the exact sign-flip p, 2/2^n
            p = level.p_sign_flip if not math.isnan(level.p_sign_flip) else sign_flip_p(level.differences)
            comparison.p_value, comparison.basis = p, f"sign-flip over {level.pairs} seeds (identical differences)"
    elif level.pairs == 1 and isinstance(per_seed.get(seeds[0]), RunPair):
        comparison.p_value, comparison.basis = per_seed[seeds[0]].p_mcnemar, SINGLE_SEED
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
    label: str                        # "1", "1=", "3", "1~", "unpaired", "2 (partly unpaired)"
    p_adjusted: Optional[float]       # Holm-adjusted p against the best-mean row (over all the table's pairs)
    basis: str                        # how the row was compared with the best-mean row
    pairs: int
    seeds_needed: Optional[int]       # seeds to resolve RESOLVE_POINTS against the best-mean row
    position: Optional[int] = None    # 1 + rows significantly better; None: tested against no row
    better: int = 0                   # rows significantly better than this one
    untested: int = 0                 # ranked rows this one could not be compared with


def rank_rows(means: Sequence[float], runs: Sequence[Mapping[int, SeedRun]], alpha: float = ALPHA) -> List[Rank]:
    """Ranks of a table's rows: every pair of rows is compared (`compare_runs`), Holm's correction
    is applied over all of the table's comparisons together, and a row's rank is 1 + the number of
    rows significantly better than it at `alpha` (by the sign of their paired difference). So a
    row is never placed below a row that was not shown to be better, and rows sharing a rank are
    all marked tied ("2=" each). A row decided by a single seed's McNemar test (test-set noise
    only, no training noise) is marked "~" instead ("1~"). A row that could be compared with no
    other row gets no rank ("unpaired"); one untested against some rows says so ("(partly unpaired)")."""
    order = sorted(range(len(means)), key=lambda i: -means[i])
    if not order:
        return []
    if len(order) == 1:
        return [Rank("1", None, "only row", 0, None, position=1)]
    pairs = [(i, j) for x, i in enumerate(order) for j in order[x + 1:]]
    comparisons = {(i, j): compare_runs(runs[i], runs[j], with_permutation=False, interval=False) for i, j in pairs}
    tested = [key for key in pairs if comparisons[key].p_value is not None]
    adjusted = dict(zip(tested, holm([comparisons[key].p_value for key in tested])))
    better = {i: 0 for i in order}
    untested = {i: 0 for i in order}
    single = {i: False for i in order}
    for i, j in pairs:
        if (i, j) not in adjusted:
            untested[i] += 1
            untested[j] += 1
            continue
        c = comparisons[(i, j)]
        single[i] |= c.single_seed
        single[j] |= c.single_seed
        if adjusted[(i, j)] < alpha and c.seed_level.mean != 0:
            better[j if c.seed_level.mean > 0 else i] += 1
    others = len(order) - 1
    position = {i: (None if untested[i] == others else 1 + better[i]) for i in order}
    # "partly unpaired" counts only partners that are ranked: a row paired with nobody marks no one else
    untested = {i: sum(1 for j in order if j != i and position[j] is not None
                       and (i, j) not in adjusted and (j, i) not in adjusted) for i in order}
    count: Dict[int, int] = {}
    for i in order:
        if position[i] is not None:
            count[position[i]] = count.get(position[i], 0) + 1
    best = order[0]
    ranks: List[Rank] = []
    for i in range(len(means)):
        at = position[i]
        if at is None:
            label = "unpaired"
        else:
            label = str(at) + ("~" if single[i] else "=" if count[at] > 1 else "")
            label += " (partly unpaired)" if untested[i] else ""
        against = comparisons.get((best, i))
        ranks.append(Rank(label, adjusted.get((best, i)), "best" if i == best else against.basis,
                          0 if against is None else against.pairs,
                          None if against is None else against.seed_level.seeds_needed,
                          position=at, better=better[i], untested=untested[i]))
    return ranks

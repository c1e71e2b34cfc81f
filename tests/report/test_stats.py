"""Paired statistics against reference computations on constructed data."""
import math

import numpy as np
import pytest
from scipy import special, stats

from sparsebench.report.leaderboard import Leaderboard, to_markdown
from sparsebench.report.stats import (
    SeedRun, Unpairable, bootstrap_difference, compare_runs, holm, mcnemar_exact, over_seeds, pair_runs,
    pair_samples, rank_rows, seeds_needed, sign_flip_p,
)
from sparsebench.store.record import PerSample

from conftest import make_record

N = 450
LABELS = np.arange(N) % 10


def hits(wrong, n=N):
    v = np.ones(n, dtype=bool)
    v[list(wrong)] = False
    return v


def per_sample(v, labels=LABELS, dataset="digits", split_seed=0):
    return PerSample.of(v, labels, dataset, split_seed)


def record(method, seed, v, **kw):
    return make_record(method, seed, float(np.mean(v)), per_sample=per_sample(v), run_id=f"{method}-{seed}", **kw)


def test_exact_mcnemar_on_known_discordant_counts():
    # b = 10 (A right, B wrong), c = 2: p = 2 * P(X <= 2), X ~ Bin(12, 1/2) = 2 * (1 + 12 + 66) / 4096
    assert mcnemar_exact(10, 2) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact(2, 10) == pytest.approx(158 / 4096, rel=1e-12)
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    # the counts come from the samples: 20 wrong in both, 10 only B wrong, 2 only A wrong
    both = range(20)
    a = hits([*both, 30, 31])
    b = hits([*both, *range(40, 50)])
    pair = pair_samples(per_sample(a), per_sample(b))
    assert (pair.a_only, pair.b_only, pair.n) == (10, 2, N)
    assert pair.difference == pytest.approx(100 * 8 / N)
    assert pair.p_mcnemar == pytest.approx(158 / 4096, rel=1e-12)
    assert pair.low < pair.difference < pair.high


def test_paired_bootstrap_interval_covers_the_true_difference():
    """A simulation: correlated correctness (shared hard samples), true difference 5 points."""
    rng = np.random.default_rng(1)
    trials, covered = 40, 0
    for t in range(trials):
        u = rng.random(N)
        a, b = u < 0.90, u < 0.85                 # A right on every sample B gets right, and 5 % more
        low, high = bootstrap_difference(a, b, resamples=1000, seed=t)
        covered += low <= 5.0 <= high
    assert covered / trials >= 0.85               # nominal 0.95; 40 trials
    assert bootstrap_difference(a, a) == (0.0, 0.0)


def test_over_seeds_matches_scipy_t_and_the_exact_sign_flip():
    d = [1.0, 3.0, 2.5]
    s = over_seeds([0, 1, 2], d)
    ref = stats.ttest_1samp(d, 0.0)
    half = stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / math.sqrt(3)
    assert s.mean == pytest.approx(np.mean(d))
    assert (s.low, s.high) == pytest.approx((np.mean(d) - half, np.mean(d) + half))
    assert s.p_t == pytest.approx(ref.pvalue)
    # 8 sign patterns; only all-plus and all-minus reach |mean| >= 13/6
    assert s.p_sign_flip == pytest.approx(2 / 8)
    assert sign_flip_p([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == pytest.approx(2 / 64)
    one = over_seeds([0], [2.0])
    assert one.pairs == 1 and math.isnan(one.low) and math.isnan(one.p_t) and one.seeds_needed is None


def test_seeds_needed_reaches_80_percent_power_and_one_fewer_does_not():
    def power(n, sd, diff=1.0):
        df, tc = n - 1, stats.t.ppf(0.975, n - 1)
        nc = diff / (sd / math.sqrt(n))
        return stats.nct.sf(tc, df, nc) + stats.nct.cdf(-tc, df, nc)

    assert seeds_needed(1.0) == 10               # effect size 1: the textbook n = 10 for a paired t-test
    for sd in (0.5, 2.0, 3.7):
        n = seeds_needed(sd)
        assert power(n, sd) >= 0.8 and (n == 2 or power(n - 1, sd) < 0.8)
    assert seeds_needed(20.0) == 3142                         # scipy's nct lower tail underflows to NaN here
    assert seeds_needed(float("nan")) is None and seeds_needed(1000.0) is None
    assert seeds_needed(30.0) == pytest.approx(7066, abs=3)       # ≈ ((1.96 + 0.84) × 30)² + 2


def test_holm_against_hand_computation():
    # sorted 0.01, 0.03, 0.04 -> 3*0.01, max(0.03, 2*0.03), max(0.06, 1*0.04)
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])


def test_records_from_different_test_sets_are_refused_with_one_line():
    v = hits(range(30))
    a = record("rigl", 0, v)
    other_labels = make_record("set", 0, 0.9, per_sample=per_sample(v, labels=(LABELS + 1) % 10), run_id="x")
    other_seed = make_record("set", 0, 0.9, per_sample=per_sample(v, split_seed=1), run_id="y")
    old = make_record("set", 0, 0.9, run_id="old")
    for b, words in ((other_labels, "labels_sha256"), (other_seed, "split_seed"), (old, "no per-sample results")):
        with pytest.raises(Unpairable) as e:
            pair_runs(a, b)
        assert words in str(e.value) and "\n" not in str(e.value)
    # over seeds such a pair still has its top-1 difference, and says why there is no sample-level test
    c = compare_runs({0: SeedRun(90.0, a.per_sample, "a")}, {0: SeedRun(88.0, other_seed.per_sample, "b")})
    assert c.basis == "unpaired" and c.p_value is None and "split_seed" in c.per_seed[0]


def test_grouping_merges_identical_results_and_separates_a_10_percent_difference():
    base = hits(range(45))                       # 90 %
    same = base.copy()
    worse = hits(range(90))                      # wrong on 10 % more of the samples
    records = [record("gap", 0, base), record("rigl", 0, same), record("set", 0, worse)]
    table = Leaderboard.of(records).table.set_index("method")
    assert table.loc["set", "rank"] == "3" and table.loc["set", "rank_basis"] == "McNemar, 1 seed"
    assert {table.loc["gap", "rank"], table.loc["rigl", "rank"]} == {"1", "1="}
    assert table.loc["set", "rank_p"] == pytest.approx(min(1.0, 2 * 2 * 0.5 ** 45), rel=1e-6)  # Holm x2
    md = to_markdown(Leaderboard.of(records).table)
    assert "| 1=" in md and "| 3 " in md
    # three seeds, the same per-sample results each seed: merged; 10 % worse each seed: separated
    records = [record(m, s, v) for s in range(3) for m, v in (("gap", base), ("rigl", same), ("set", worse))]
    table = Leaderboard.of(records).table.set_index("method")
    assert {table.loc["gap", "rank"], table.loc["rigl", "rank"]} == {"1", "1="}
    assert table.loc["set", "rank"] == "3" and table.loc["set", "rank_basis"] == "paired t over 3 seeds"


def test_grouping_over_seeds_holm_corrected():
    rng = np.random.default_rng(0)
    means, runs = [], []
    for shift in (0.0, 0.3, 6.0):                # per-seed differences to the best: ~0.3 (noise) and ~6
        by_seed = {s: SeedRun(90.0 - shift + rng.normal(0, 1.0)) for s in range(5)}
        runs.append(by_seed)
        means.append(np.mean([r.top1 for r in by_seed.values()]))
    ranks = rank_rows(means, runs)
    order = np.argsort(means)[::-1]
    assert [ranks[i].label for i in order] == ["1", "1=", "3"]
    p = [compare_runs(runs[order[0]], runs[i]).p_value for i in order[1:]]
    assert [ranks[i].p_adjusted for i in order[1:]] == pytest.approx(holm(p))
    assert ranks[order[2]].basis == "paired t over 5 seeds" and ranks[order[2]].seeds_needed >= 2


def test_older_records_without_per_sample_results_read_and_rank_unpaired():
    records = [make_record("gap", 0, 0.95), make_record("rigl", 0, 0.90), make_record("set", 1, 0.99)]
    table = Leaderboard.of(records).table.set_index("method")
    assert table.loc["set", "rank"] == "1"
    assert table.loc["gap", "rank"] == "2 (unpaired)" and table.loc["rigl", "rank"] == "3 (unpaired)"
    assert table.loc["gap", "rank_basis"] == "unpaired"


def test_seed_method_row_shows_its_difference_to_the_strongest_baseline():
    from sparsebench.store import Mechanism

    acted = Mechanism(declared=True, acted=True, reason="acted")
    none = Mechanism(declared=False, acted=None, reason="baseline")
    records = [make_record("rigl", s, t, mechanism=acted) for s, t in enumerate([0.90, 0.92, 0.91])]
    records += [make_record("magnitude-global", s, t, mechanism=none) for s, t in enumerate([0.85, 0.86, 0.88])]
    records += [make_record("random", s, t, mechanism=none) for s, t in enumerate([0.70, 0.71, 0.72])]
    records += [make_record("dense", s, 0.99, mechanism=none, run_id=f"dense-{s}") for s in range(3)]
    table = Leaderboard.of(records).table.set_index("method")
    row = table.loc["rigl"]
    assert row["baseline"] == "magnitude-global" and row["baseline_pairs"] == 3
    d = [5.0, 6.0, 3.0]
    assert row["baseline_delta"] == pytest.approx(np.mean(d))
    assert row["baseline_delta_ci"] == pytest.approx(stats.t.ppf(0.975, 2) * np.std(d, ddof=1) / math.sqrt(3))
    assert table.loc["random", "baseline_pairs"] == 0          # baselines carry no Δ baseline
    assert "vs magnitude-global (n=3)" in to_markdown(Leaderboard.of(records).table)


def test_binomial_reference_is_scipy_free():
    """The McNemar reference above, by the binomial sum itself."""
    b, c = 7, 19
    n = b + c
    p = 2 * sum(special.comb(n, k, exact=True) for k in range(min(b, c) + 1)) / 2 ** n
    assert mcnemar_exact(b, c) == pytest.approx(min(1.0, p), rel=1e-12)


def write_records(root, records):
    from sparsebench.store.records import RecordStore

    store = RecordStore(root)
    for r in records:
        store.write(r)
    return root


def test_compare_command_pairs_by_seed_and_gives_sample_level_tests(tmp_path, capsys):
    import json

    from sparsebench.cli import main

    a_hits = [hits(range(20 + s)) for s in range(3)]
    b_hits = [hits(range(40 + 3 * s)) for s in range(3)]
    records = [record("gap", s, v) for s, v in enumerate(a_hits)] + [record("rigl", s, v) for s, v in enumerate(b_hits)]
    records += [make_record("rigl", 0, 0.5, target=0.9, run_id="rigl-0.9")]          # no partner: not listed
    root = write_records(tmp_path, records)
    assert main(["compare", str(root), "gap", "rigl", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 1
    row = rows[0]
    d = [100 * (np.mean(x) - np.mean(y)) for x, y in zip(a_hits, b_hits)]
    ref = stats.ttest_1samp(d, 0.0)
    assert row["pairs"] == 3 and row["target"] == "sparsity=0.5"
    assert row["mean"] == pytest.approx(np.mean(d), abs=1e-4)
    assert (row["low"], row["high"]) == pytest.approx(tuple(ref.confidence_interval(0.95)), abs=1e-4)
    assert row["p_t"] == pytest.approx(ref.pvalue, rel=1e-3) and row["p_sign_flip"] == pytest.approx(0.25)
    seed0 = row["per_seed"]["0"]
    assert (seed0["a_only"], seed0["b_only"]) == (20, 0)
    assert seed0["p_mcnemar"] == pytest.approx(stats.binomtest(20, 20, 0.5).pvalue, rel=1e-3)
    assert main(["compare", str(root), "gap", "rigl"]) == 0
    text = capsys.readouterr().out
    assert "A = gap  vs  B = rigl" in text and "20 / 0" in text


@pytest.mark.parametrize("argv, words", [
    (["gap", "nosuch"], "unknown method 'nosuch'; allowed: gap, rigl"),
    (["gap", "rigl", "--target", "sparsity=0.9"], "no (model, dataset, target, device) where both"),
    (["gap", "gap"], "name two different methods"),
])
def test_compare_command_errors_are_one_line_exit_2(tmp_path, capsys, argv, words):
    from sparsebench.cli import main

    root = write_records(tmp_path, [make_record("gap", 0, 0.9, run_id="g"), make_record("rigl", 0, 0.8, run_id="r")])
    assert main(["compare", str(root), *argv]) == 2
    err = capsys.readouterr().err
    assert words in err and err.count("\n") == 1


def test_compare_text_names_pairs_refused_for_different_test_sets(tmp_path, capsys):
    from sparsebench.cli import main

    v = hits(range(30))
    records = [record("gap", 0, v),
               make_record("rigl", 0, 0.9, per_sample=per_sample(v, split_seed=1), run_id="rigl-0")]
    assert main(["compare", str(write_records(tmp_path, records)), "gap", "rigl"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("not paired sample by sample")]
    assert len(lines) == 1 and "seed 0: different test sets: split_seed 0 vs 1" in lines[0]

import math

import pandas as pd
import pytest

from sparsebench.report.leaderboard import aggregate, ci95, records_frame, to_markdown
from sparsebench.report.plots import pareto_front, plot


def fake_record(method, seed, top1, target=0.5, kind="sparsity", realizable=False, speedup=None):
    return {
        "run_id": f"{method}-{seed}-{target}", "method": method, "model": "m", "dataset": "d", "seed": seed,
        "spec": {"method_args": {}}, "granularity": "unstructured", "target": {"kind": kind, "value": target},
        "test_top1": top1, "test_top5": None, "dense_test_top1": 0.9, "achieved_sparsity": target or 0.0,
        "achieved_flops_ratio": 1 - (target or 0), "macs": {"effective": 1e6 * (1 - (target or 0)), "dense": 1e6},
        "params": {"nonzero": 1000}, "theoretical_speedup": 1 / (1 - (target or 0)), "measured_speedup": speedup,
        "realization": {"realizable": realizable}, "cost": {"method_steps": 0, "method_wall_seconds": 0.0},
    }


def test_ci95_is_the_t_interval():
    values = pd.Series([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.3027; sd = 1; n = 3
    assert ci95(values) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ci95(pd.Series([1.0])))


def test_aggregate_means_over_seeds_per_target():
    records = [fake_record("random", s, t) for s, t in enumerate([0.80, 0.82, 0.84])]
    records += [fake_record("random", 0, 0.5, target=0.9)]
    agg = aggregate(records_frame(records))
    row = agg[(agg["method"] == "random") & (agg["target"] == 0.5)].iloc[0]
    assert row["seeds"] == 3 and row["top1"] == pytest.approx(82.0)
    assert row["delta"] == pytest.approx(-8.0)
    assert row["top1_ci"] == pytest.approx(4.302653 * 2.0 / math.sqrt(3), rel=1e-4)
    md = to_markdown(agg)
    assert "82.00 ± " in md and "not realizable" in md


def test_pareto_front():
    import numpy as np

    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([50.0, 70.0, 60.0, 80.0])
    assert list(pareto_front(x, y, larger_x_better=False)) == [0, 1, 3]


def test_plots_are_written(tmp_path):
    records = [fake_record("l1-channel", s, 0.8 + 0.01 * s, kind="flops", realizable=True, speedup=1.5 + 0.1 * s)
               for s in range(3)]
    records += [fake_record("dense", 0, 0.9, target=None, kind="none", realizable=True, speedup=1.0)]
    agg = aggregate(records_frame(records))
    for x in ("macs", "speedup"):
        path = plot(agg, tmp_path / f"{x}.png", x=x)
        assert path.stat().st_size > 10_000


def test_method_label_ignores_tuple_defaults_read_back_from_json():
    from sparsebench.methods import config_dict, create_method
    from sparsebench.report.leaderboard import method_label

    args = {k: list(v) if isinstance(v, tuple) else v for k, v in config_dict(create_method("pass").config).items()}
    assert method_label({"method": "pass", "spec": {"method_args": args}}) == "pass"
    args["residual_mode"] = "coupled"
    assert method_label({"method": "pass", "spec": {"method_args": args}}) == "pass[residual_mode=coupled]"

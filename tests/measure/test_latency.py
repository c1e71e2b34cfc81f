import pytest
import torch

from sparsebench.measure.latency import LatencySettings, bootstrap_ratio_ci, compare_latency
from sparsebench.models import create_model

from conftest import requires_cuda

FAST = LatencySettings(batch_sizes=(1, 4), threads=1, min_run_time=0.01, rounds=3)


def test_compare_latency_reports_medians_iqr_and_speedup():
    dense = create_model("resnet20_tiny", img_size=16)
    small = create_model("resnet20_tiny", img_size=16, width=0.5)
    result = compare_latency(dense, small, (3, 16, 16), FAST)
    assert set(result) == {"1", "4"}
    for batch, r in result.items():
        assert r["batch_size"] == int(batch) and r["blocks"] == 3
        assert r["dense_ms"] > 0 and r["realized_ms"] > 0 and r["dense_iqr_ms"] >= 0
        assert r["measured_speedup"] == pytest.approx(r["dense_ms"] / r["realized_ms"])
        lo, hi = r["speedup_ci95"]
        assert lo <= hi


def test_threads_are_restored():
    before = torch.get_num_threads()
    model = create_model("resnet20_tiny", img_size=16)
    compare_latency(model, model, (3, 16, 16), LatencySettings(batch_sizes=(1,), threads=2, min_run_time=0.01,
                                                                rounds=2))
    assert torch.get_num_threads() == before


def test_bootstrap_interval_contains_the_point_estimate():
    a, b = [2.0, 2.1, 1.9, 2.05, 1.95], [1.0, 1.02, 0.98, 1.01, 0.99]
    lo, hi = bootstrap_ratio_ci(a, b)
    assert lo <= 2.0 <= hi


@requires_cuda
@pytest.mark.cuda
def test_cuda_timing_path():
    dense = create_model("resnet20_tiny", img_size=16)
    small = create_model("resnet20_tiny", img_size=16, width=0.5)
    settings = LatencySettings(batch_sizes=(1, 64), cuda_warmup=5, cuda_iters=20, rounds=2)
    result = compare_latency(dense, small, (3, 16, 16), settings, torch.device("cuda"))
    assert result["64"]["measured_speedup"] > 0


def test_timing_stops_early_only_once_the_interval_is_tight_and_says_so(tmp_path):
    from sparsebench.platform import use_timing_section

    model = create_model("resnet20_tiny", img_size=16)
    base = dict(batch_sizes=(1,), threads=1, min_run_time=0.01, rounds=6, min_rounds=4)
    wide = compare_latency(model, model, (3, 16, 16), LatencySettings(**base, stop_width=10.0))["1"]
    assert (wide["blocks"], wide["max_blocks"], wide["stopped_early"]) == (4, 6, True)   # any interval is tight
    strict = compare_latency(model, model, (3, 16, 16), LatencySettings(**base, stop_width=0.0))["1"]
    assert (strict["blocks"], strict["stopped_early"]) == (6, False)                    # none is: every block
    assert wide["exclusive"] is False and strict["exclusive"] is False                  # no section outside a run
    with use_timing_section(tmp_path / "timing"):
        inside = compare_latency(model, model, (3, 16, 16), LatencySettings(**base, stop_width=0.0))["1"]
    assert inside["exclusive"] is True

import time
from dataclasses import replace

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


def test_timing_in_another_dtype_leaves_the_callers_models_as_they_were():
    """bf16 timing casts copies: the dense model keeps its dtype and train mode, so the next FLOPs
    target can still be compacted from it and checked on an fp32 probe."""
    from sparsebench.methods import create_method
    from sparsebench.methods.baselines import unit_space

    torch.manual_seed(0)
    dense = create_model("resnet20_tiny", img_size=16).train()
    before = {n: (t.dtype, t.device, t.stride()) for n, t in dense.state_dict().items()}
    method = create_method("l1-channel")
    space = unit_space(dense, (3, 16, 16), method.config.residual_mode)
    scores = method.unit_scores(dense, space, torch.Generator().manual_seed(0))
    probe = torch.randn(2, 3, 16, 16)
    settings = LatencySettings(batch_sizes=(1,), min_run_time=0.01, rounds=2, dtype="bfloat16", channels_last=True)
    for target in (0.75, 0.5):                     # the second target failed when the first cast `dense`
        kept = space.select(scores, target, scope=method.config.scope, min_units=method.config.min_channels)
        compact = space.compact(dense, kept).eval()
        assert space.check_compaction(dense, kept, compact, probe) < 1e-4
        result = compare_latency(dense, compact, (3, 16, 16), settings)
        assert result["1"]["measured_speedup"] > 0
        assert {n: (t.dtype, t.device, t.stride()) for n, t in dense.state_dict().items()} == before
        assert all(p.dtype == torch.float32 for p in compact.parameters()) and not compact.training
        assert all(m.training for m in dense.modules())


def test_a_model_already_in_the_timing_dtype_is_timed_without_a_copy(monkeypatch):
    import copy

    from sparsebench.measure import latency

    def no_copy(obj, memo=None):
        raise AssertionError("copied a model that needed no cast")

    monkeypatch.setattr(copy, "deepcopy", no_copy)
    model = create_model("resnet20_tiny", img_size=16)
    assert latency._prepare(model, torch.device("cpu"), FAST) is model


def _fake_cuda_timing(monkeypatch, seen, fail=False):
    """compare_latency down its CUDA path on a CPU: inputs allocated on the CPU, each pair's timing
    replaced by a stand-in that notes the process-wide cudnn.benchmark it runs under."""
    from sparsebench.measure import latency

    monkeypatch.setattr(latency, "_prepare", lambda model, device, settings, example=None: model)
    cpu_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *size, device=None, **kw: cpu_randn(*size, **kw))

    def fake_pair(models, x, settings, cuda):
        seen.append((cuda, torch.backends.cudnn.benchmark))
        if fail:
            raise RuntimeError("CUDA error: out of memory")
        return {"measured_speedup": 1.0}

    monkeypatch.setattr(latency, "_time_pair", fake_pair)


@pytest.mark.parametrize("before", [False, True])
def test_cudnn_benchmark_is_on_while_timing_on_cuda_and_restored_after(monkeypatch, before):
    seen = []
    _fake_cuda_timing(monkeypatch, seen)
    model = create_model("resnet20_tiny", img_size=16)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", before)
    compare_latency(model, model, (3, 16, 16), LatencySettings(batch_sizes=(1, 2)), torch.device("cuda"))
    assert seen == [(True, True), (True, True)]
    assert torch.backends.cudnn.benchmark is before


def test_cudnn_benchmark_is_restored_when_timing_fails(monkeypatch):
    seen = []
    _fake_cuda_timing(monkeypatch, seen, fail=True)
    model = create_model("resnet20_tiny", img_size=16)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    with pytest.raises(RuntimeError, match="out of memory"):
        compare_latency(model, model, (3, 16, 16), LatencySettings(batch_sizes=(1,)), torch.device("cuda"))
    assert seen == [(True, True)] and torch.backends.cudnn.benchmark is False


def test_a_time_bound_shortens_blocks_and_rounds_but_keeps_two_blocks_each():
    model = create_model("resnet20_tiny", img_size=16)
    small = create_model("resnet20_tiny", img_size=16, width=0.5)
    slow = LatencySettings(batch_sizes=(1,), min_run_time=0.5, rounds=6, stop_width=0.0)   # >= 6 s unbounded
    start = time.perf_counter()
    result = compare_latency(model, small, (3, 16, 16), replace(slow, max_seconds=0.6))["1"]
    assert time.perf_counter() - start < 3.0 and result["seconds"] < 1.5
    assert 2 <= result["blocks"] < 6 and result["stopped_by"] == "time cap" and result["stopped_early"]
    assert result["measured_speedup"] > 0
    tiny = compare_latency(model, small, (3, 16, 16), replace(slow, max_seconds=1e-3))["1"]   # less than a call
    assert tiny["blocks"] == 2 and tiny["stopped_by"] == "time cap"


class _HostEvent:
    """torch.cuda.Event on the host clock, for the CUDA timing path on a CPU."""

    def __init__(self, enable_timing=False):
        self.at = None

    def record(self):
        self.at = time.perf_counter()

    def elapsed_time(self, end):
        return (end.at - self.at) * 1e3


def test_the_cuda_path_under_a_time_bound_sizes_its_blocks_from_the_warm_up(monkeypatch):
    """On CUDA a block is `cuda_iters` calls; under `max_seconds` the calls per block come from the
    warm-up's per-call time so that `min_rounds` blocks fit, and timing ends within the bound."""
    from sparsebench.measure import latency

    cpu_randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *size, device=None, **kw: cpu_randn(*size, **kw))
    monkeypatch.setattr(latency, "_prepare", lambda model, device, settings, example=None: model.eval())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "Event", _HostEvent)
    model = create_model("resnet20_tiny", img_size=16)
    settings = LatencySettings(batch_sizes=(8,), rounds=6, min_rounds=4, stop_width=0.0, cuda_warmup=50,
                               cuda_iters=200)
    start = time.perf_counter()
    result = compare_latency(model, model, (3, 64, 64), replace(settings, max_seconds=1.0), torch.device("cuda"))["8"]
    assert time.perf_counter() - start < 2.5                 # unbounded: 50 + 6 × 200 calls per model, many seconds
    calls = result["calls_per_block"]
    assert 1 <= calls["dense"] < 200 and 1 <= calls["realized"] < 200
    assert result["blocks"] >= 2 and result["measured_speedup"] > 0

import pytest
import torch
from torch import nn

from sparsebench.measure.latency import LatencySettings, compare_latency
from sparsebench.measure.realize import realize
from sparsebench.measure.sparse24 import is_2to4, prune_2to4_
from sparsebench.measure.unstructured import Calibration

from conftest import requires_cuda


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(128, 256), nn.ReLU(), nn.Linear(256, 128))


def test_structured_and_dense_outcomes_are_realized_as_they_are():
    model = mlp()
    for kind in ("dense", "compacted"):
        r = realize(model, kind, torch.device("cpu"))
        assert r.realizable and r.kind == kind and r.model is model


def test_unstructured_masks_are_realized_by_auto_once_calibrated():
    model = mlp()
    with torch.no_grad():
        model[0].weight[torch.rand_like(model[0].weight) < 0.9] = 0
    uncalibrated = realize(model, "masked", torch.device("cpu"))
    assert not uncalibrated.realizable and uncalibrated.model is None and "not calibrated" in uncalibrated.reason
    assert "2:4" not in uncalibrated.reason
    r = realize(model, "masked", torch.device("cpu"), calibration=Calibration(input_size=(128,), batch=8))
    assert r.realizable and r.kind == "auto" and r.reason is None and r.dtype == "float32"
    assert [e["layer"] for e in r.as_dict()["layers"]] == ["0", "2"]
    assert r.details["layers"][1]["reason"] == "no zeros"


def test_two_four_without_a_kernel_says_why():
    model = mlp()
    for layer in (model[0], model[2]):
        prune_2to4_(layer)
    r = realize(model, "masked", torch.device("cpu"), pattern="2:4")
    assert not r.realizable
    assert "2 Linear weights are 2:4" in r.reason and "CUDA" in r.reason
    assert r.as_dict()["linear_2to4"] == 2


def lucky_random_masks(density: float = 1 / 32, size: int = 192) -> nn.Module:
    """Two Linear layers with random unstructured masks that happen to satisfy 2:4 (at density
    1/32 on 192×192 about a third of random masks do)."""
    generator = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(size, size), nn.ReLU(), nn.Linear(size, size))
    for layer in (model[0], model[2]):
        while True:
            mask = torch.rand(size, size, generator=generator) < density
            if mask.any() and is_2to4(mask.float()):
                break
        with torch.no_grad():
            layer.weight.mul_(mask)
    return model


def test_masks_that_are_two_four_by_chance_are_unstructured_unless_declared(monkeypatch):
    from sparsebench.measure import realize as realize_module

    model = lucky_random_masks()
    assert all(is_2to4(m.weight) for m in (model[0], model[2]))
    # a GPU with 2:4 kernels: the check that decides is the declaration, not the device
    monkeypatch.setattr(realize_module, "semi_structured_support", lambda device, dtype: (True, "fake kernels"))
    converted = []

    def fake_conversion(m, dtype):
        converted.append(dtype)
        return m, 2, []

    monkeypatch.setattr(realize_module, "to_semi_structured", fake_conversion)
    undeclared = realize(model, "masked", torch.device("cuda"))
    assert not undeclared.realizable and undeclared.kind is None and not converted
    assert "unstructured" in undeclared.reason and "2:4" not in undeclared.reason
    other = realize(model, "masked", torch.device("cuda"), pattern="1:4")
    assert not other.realizable and other.details["declared_pattern"] == "1:4" and not converted
    # on the CPU, calibrated: undeclared and 1:4 masks both take the unstructured path
    for pattern in (None, "1:4"):
        r = realize(model, "masked", torch.device("cpu"), pattern=pattern,
                    calibration=Calibration(input_size=(192,), batch=4, max_seconds=0.5))
        assert r.realizable and r.kind == "auto" and r.details.get("declared_pattern") == pattern
    declared = realize(model, "masked", torch.device("cuda"), pattern="2:4")
    assert declared.realizable and declared.kind == "2:4" and declared.dtype == "float16"
    assert converted == [torch.float16] and declared.details["linear_2to4"] == 2


def test_a_declared_pattern_the_weights_do_not_follow_is_not_realized():
    model = mlp()
    r = realize(model, "masked", torch.device("cpu"), pattern="2:4")
    assert not r.realizable and "declared 2:4 masks but no Linear weight is 2:4" in r.reason


@requires_cuda
@pytest.mark.cuda
def test_two_four_on_gpu_is_timed_in_half_precision():
    device = torch.device("cuda")
    model = mlp().to(device)
    for layer in (model[0], model[2]):
        prune_2to4_(layer)
    r = realize(model, "masked", device, pattern="2:4")
    if not r.realizable:
        pytest.skip(r.reason)
    assert r.kind == "2:4" and r.dtype == "float16" and r.details["converted"] >= 1
    x = torch.randn(64, 128, device=device, dtype=torch.float16)
    with torch.inference_mode():
        assert torch.allclose(model.half()(x).float(), r.model(x).float(), atol=5e-2, rtol=5e-2)
    timing = compare_latency(mlp().to(device), r.model, (128,),
                             LatencySettings(batch_sizes=(64,), dtype="float16", cuda_warmup=5, cuda_iters=20,
                                             rounds=2), device)
    assert timing["64"]["measured_speedup"] > 0

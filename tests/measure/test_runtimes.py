"""Runtimes: eager, torch.compile and ONNX Runtime run the same model with the same output; a
realization a runtime cannot run is refused in one line; latency entries name their runtime."""
import pytest
import torch

from sparsebench.measure.latency import LatencySettings, compare_latency
from sparsebench.measure.realize import realize
from sparsebench.measure.runtimes import RuntimeUnsupported, for_runtime
from sparsebench.measure.unstructured import Calibration

from test_unstructured import magnitude_pruned

CPU = torch.device("cpu")
QUICK = LatencySettings(batch_sizes=(1, 2), min_run_time=0.01, rounds=2, min_rounds=2, warmup=1)


@pytest.mark.parametrize("name, runtime", [("resnet20_tiny", "compile"), ("resnet20_tiny", "onnxruntime"),
                                           ("vit_cifar_tiny", "onnxruntime")])   # the ViT compiles below
def test_every_runtime_runs_the_dense_model_to_the_same_output(runtime, name):
    torch.manual_seed(0)
    model = magnitude_pruned(name, 0.5)
    x = torch.randn(3, 3, 16, 16)
    run = for_runtime(model, runtime, x[:1])
    with torch.inference_mode():
        assert torch.allclose(run(x), model(x), atol=1e-4)       # another batch than the one it was built at


def test_onnxruntime_refuses_sparse_kernels_in_one_line_and_compile_runs_them():
    masked = magnitude_pruned("vit_cifar_tiny", 0.9)
    realized = realize(masked, "masked", CPU, calibration=Calibration(input_size=(3, 16, 16)), kernel="csr")
    assert realized.details["sparse_layers"] > 0
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(RuntimeUnsupported) as refused:
        for_runtime(realized.model, "onnxruntime", x)
    message = str(refused.value)
    assert message.startswith("not supported by onnxruntime: ") and "\n" not in message and "torch.sparse" in message
    compiled = for_runtime(realized.model, "compile", x)
    with torch.inference_mode():
        assert torch.allclose(compiled(x), masked(x), atol=1e-4)


def test_latency_under_a_runtime_times_dense_and_realized_both_under_it():
    dense = magnitude_pruned("resnet20_tiny", 0.0)
    timed = compare_latency(dense, dense, (3, 16, 16), LatencySettings(**{**QUICK.__dict__, "runtime": "onnxruntime"}))
    assert set(timed) == {"1", "2"} and all(t["runtime"] == "onnxruntime" for t in timed.values())
    assert all(t["measured_speedup"] > 0 for t in timed.values())
    masked = magnitude_pruned("resnet20_tiny", 0.9)
    realized = realize(masked, "masked", CPU, calibration=Calibration(input_size=(3, 16, 16)), kernel="csr")
    with pytest.raises(RuntimeUnsupported, match="^not supported by onnxruntime: "):
        compare_latency(dense, realized.model, (3, 16, 16), LatencySettings(**{**QUICK.__dict__,
                                                                                "runtime": "onnxruntime"}))


def test_an_unknown_runtime_is_refused_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown runtime 'tensorrt'; allowed: eager, compile, onnxruntime"):
        for_runtime(magnitude_pruned("resnet20_tiny", 0.0), "tensorrt", torch.randn(1, 3, 16, 16))

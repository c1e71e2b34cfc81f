"""Runtimes a model is timed under (measurement spec §3): the same model, run by a different engine.

| runtime       | what runs                                                                   |
|---------------|-----------------------------------------------------------------------------|
| `eager`       | the PyTorch module as it is                                                 |
| `compile`     | `torch.compile` (inductor); layers it cannot trace (torch.sparse CSR products) run eagerly between compiled graphs (graph breaks) |
| `onnxruntime` | the module exported to ONNX (TorchScript-based exporter, dynamic batch) run by an ONNX Runtime session on the CPU execution provider |

A speedup under a runtime is always dense and realized both under that runtime (same process,
same device, same input): a runtime that speeds up dense and sparse alike does not change it.
Where a runtime cannot run a realization, `RuntimeUnsupported` says so in one line beginning
"not supported by RUNTIME" (ONNX has no export for torch.sparse layers or 2:4 semi-structured
weights; ONNX Runtime's CPU provider runs no CUDA tensors), and the entry records that reason.
"""
from __future__ import annotations

import io
import warnings
import torch
from torch import nn

from sparsebench.measure.unstructured import CSRConv2d, CSRLinear, outputs_agree
from sparsebench.specs import RUNTIMES


class RuntimeUnsupported(RuntimeError):
    """A runtime that cannot run a model; the message is one line, "not supported by RUNTIME: why"."""

    def __init__(self, runtime: str, why: str):
        super().__init__(f"not supported by {runtime}: {why}")
        self.runtime, self.why = runtime, why


def check_runtime(runtime: str) -> str:
    if runtime not in RUNTIMES:
        raise ValueError(f"unknown runtime {runtime!r}; allowed: {', '.join(RUNTIMES)}")
    return runtime


def _sparse_layers(model: nn.Module) -> list:
    """Names of layers whose weights are not plain dense tensors: CSR products (their parts are
    buffers named crow_indices/col_indices) and 2:4 semi-structured weights."""
    out = [n for n, m in model.named_modules() if isinstance(m, (CSRLinear, CSRConv2d))]
    out += [n for n, p in model.named_parameters() if p.is_sparse or type(p.data) is not torch.Tensor]
    return out


class OnnxRuntimeModule(nn.Module):
    """An ONNX Runtime session called like a module: a CPU float tensor in, a tensor out. The
    tensor-to-array conversions share memory (no copy), so what is timed is the session's run."""

    def __init__(self, session, input_name: str):
        super().__init__()
        self.session, self.input_name = session, input_name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.detach().numpy()})[0])


def onnxruntime_session(model: nn.Module, example: torch.Tensor, threads: int):
    """`model` exported to ONNX with a dynamic batch axis, in an ONNX Runtime CPU session at `threads`
    intra-op threads (and one inter-op thread, as the eager timing runs)."""
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeUnsupported("onnxruntime", "onnxruntime is not installed (pip install 'sparsebench[export]')") \
            from None
    buffer = io.BytesIO()
    with warnings.catch_warnings():      # the TorchScript-based exporter announces its successor on every call
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (example,), buffer, input_names=["images"], output_names=["logits"],
                              dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
        except Exception as e:           # noqa: BLE001 - any exporter failure is the runtime's "cannot"
            raise RuntimeUnsupported("onnxruntime", f"ONNX export failed: {type(e).__name__}: "
                                                    f"{str(e).strip().splitlines()[0][:200]}") from None
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    return OnnxRuntimeModule(session, session.get_inputs()[0].name)


def for_runtime(model: nn.Module, runtime: str, example: torch.Tensor, threads: int = 1) -> nn.Module:
    """`model` (eval mode, on the device and in the dtype it is timed in) as `runtime` runs it; checked
    on `example` against the eager model before it is timed. Raises `RuntimeUnsupported` in one line."""
    check_runtime(runtime)
    if runtime == "eager":
        return model
    if runtime == "onnxruntime":
        if example.device.type != "cpu":
            raise RuntimeUnsupported("onnxruntime", f"this project runs ONNX Runtime's CPU execution provider "
                                                    f"only; the model is on {example.device.type}")
        sparse = _sparse_layers(model)
        if sparse:
            raise RuntimeUnsupported("onnxruntime", f"{len(sparse)} layers run torch.sparse or 2:4 kernels, "
                                                    f"which have no ONNX export (first: {sparse[0]})")
        run = onnxruntime_session(model, example[:1], threads)
    else:
        # A graph break inside a block (each CSR product is one) makes dynamo compile that block's
        # `forward` once per instance; past `recompile_limit` (8) the remaining blocks would run
        # eagerly and the "compiled" timing would be mostly eager. Process-wide, raised only.
        import torch._dynamo.config as dynamo_config

        dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 256)
        dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, 4096)
        run = torch.compile(model)
    with torch.inference_mode():
        try:
            got = run(example)
        except Exception as e:           # noqa: BLE001 - a compile failure is the runtime's "cannot"
            raise RuntimeUnsupported(runtime, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200]}") \
                from None
        reference = model(example)
    # a compiler or another engine reorders more sums than a sparse kernel does
    ok, err = outputs_agree(got, reference, 1e-3 if example.dtype in (torch.float32, torch.float64) else 5e-2)
    if not ok:
        raise RuntimeUnsupported(runtime, f"its output disagrees with eager (max abs error {err:.3g})")
    return run


"""Deployable files from a saved model: ONNX, TorchScript or torch.export, each checked against
PyTorch's own outputs on a batch before it is kept.

A compacted model exports as the smaller dense model it is. A masked model exports with its
zeros inside dense tensors: the file is correct but no faster than the dense model, and the
export says so.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from sparsebench.runners.artifacts import ArtifactError, LoadedModel

FORMATS = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "export": ".pt2"}
TOLERANCE = 1e-4          # max |Δ| relative to the largest output magnitude (at least 1)


@dataclass
class Exported:
    path: Path
    format: str
    max_abs_error: float
    batch: int
    note: str


def export_model(loaded: LoadedModel, fmt: str, path: Path, batch: int = 8) -> Exported:
    """Write `path` atomically in format `fmt`, after checking the file's outputs match the model's."""
    if fmt not in FORMATS:
        raise ArtifactError(f"bad format {fmt!r}; allowed: {', '.join(FORMATS)}")
    if not loaded.input_size:
        raise ArtifactError(f"run {loaded.run_id}: the model file records no input size to export with")
    model = loaded.model.cpu().eval()
    x = torch.randn(batch, *loaded.input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the temp name keeps the extension: torch.export.load reads only files ending in .pt2
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(fd)
    try:
        got = _WRITERS[fmt](model, x, tmp)
        error = (want - got).abs().max().item() if got.shape == want.shape else float("inf")
        if not error <= TOLERANCE * max(1.0, want.abs().max().item()):
            raise ArtifactError(f"run {loaded.run_id}: the {fmt} file's outputs differ from PyTorch's "
                                f"(max |Δ| {error:.3g}); not written")
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    note = ("masked model: exported with its zeros inside dense tensors; it runs at dense speed"
            if loaded.realization == "masked" else
            "compacted model: exported as the smaller dense model" if loaded.realization == "compacted"
            else "dense model")
    return Exported(path, fmt, error, batch, note)


def _torchscript(model, x, file: str) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():      # TorchScript announces torch.export as its successor
        warnings.simplefilter("ignore", FutureWarning)
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, file)
        return torch.jit.load(file)(x)


def _torch_export(model, x, file: str) -> torch.Tensor:
    """A program for the export batch size (`--batch`)."""
    program = torch.export.export(model, (x,))
    torch.export.save(program, file)
    with torch.no_grad():
        return torch.export.load(file).module()(x)


def _onnx(model, x, file: str) -> torch.Tensor:
    try:
        import onnxruntime
    except ImportError:
        raise ArtifactError("--format onnx needs onnx and onnxruntime: pip install 'sparsebench[export]'") from None
    import warnings

    with warnings.catch_warnings():      # the TorchScript-based exporter announces its successor
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        torch.onnx.export(model, (x,), file, input_names=["images"], output_names=["logits"],
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)
    session = onnxruntime.InferenceSession(file, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


_WRITERS = {"onnx": _onnx, "torchscript": _torchscript, "export": _torch_export}

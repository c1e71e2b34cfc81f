"""Realization: the model that is actually timed, or an honest "not realizable here".

| outcome                              | realized model                                  |
|--------------------------------------|-------------------------------------------------|
| dense                                | the dense model itself (speedup ≈ 1, a control) |
| compacted (channels/heads)           | the physically smaller dense model              |
| masked, declared 2:4 by the method   | semi-structured sparse Linear weights (fp16/bf16), only where a kernel runs |
| masked (unstructured)                | `auto`: per layer the faster of dense and CSR × dense, by a timed calibration (measure/unstructured.py) |

A 2:4 result is timed against the dense model at the same half-precision dtype. Only a method
that declares 2:4 masks (`Outcome.pattern`, the record's `sparsity_pattern`) takes the 2:4 path:
random unstructured masks satisfy 2:4 by chance often enough (density 1/32 on a 192×192 layer:
about a third of the time) that the pattern in the weights alone would mislabel them.

Every other masked model (no pattern declared, or one with no kernel of its own) is unstructured:
`auto` (the default) times dense against CSR per layer at the measured batch and keeps the faster;
`csr` puts every eligible layer with zeros on CSR. Choosing needs the input size, batch and threads
(`Calibration`); without them the realization says it was not calibrated. When no layer wins, the
realization is still `auto`, the masked model run dense, and its details say "all dense".
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from sparsebench.measure.latency import LatencySettings, compare_latency
from sparsebench.measure.sparse24 import is_2to4, semi_structured_support, to_semi_structured
from sparsebench.measure.unstructured import KERNELS, Calibration, realize_unstructured


@dataclass
class Realization:
    model: Optional[nn.Module]
    realizable: bool
    kind: Optional[str]             # dense | compacted | 2:4 | auto | csr | None
    reason: Optional[str] = None
    dtype: Optional[str] = None     # the dtype the realized model must be timed in (2:4: half precision)
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"realizable": self.realizable, "kind": self.kind, "reason": self.reason, "dtype": self.dtype,
                **self.details}


def realize(model: nn.Module, realization: str, device: torch.device, dtype: str = "float32",
            pattern: Optional[str] = None, calibration: Optional[Calibration] = None,
            kernel: str = "auto") -> Realization:
    """The model to time for an outcome. `pattern` is the N:M pattern the method declared for its
    masks ("2:4"); without one a masked model is unstructured, whatever its zeros happen to look like,
    and is realized with `kernel` ("auto" or "csr") after a calibration at `calibration`'s batch."""
    if realization in ("dense", "compacted"):
        return Realization(model, True, realization, dtype=dtype)
    if pattern != "2:4":
        return _unstructured(model, device, dtype, pattern, calibration, kernel)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    matching = [m for m in linears if (m.weight != 0).any() and is_2to4(m.weight)]
    counts = {"linear_2to4": len(matching), "linear_total": len(linears)}
    if not matching:
        return Realization(None, False, None, reason="not realizable here: the method declared 2:4 masks but no "
                                                     "Linear weight is 2:4", details=counts)
    half = dtype if dtype in ("float16", "bfloat16") else "float16"
    supported, why = semi_structured_support(device, getattr(torch, half))
    if not supported:
        return Realization(None, False, None, reason=f"not realizable here: {len(matching)} Linear weights are 2:4 "
                                                     f"but no semi-structured kernel ran ({why})", details=counts)
    sparse, converted, skipped = to_semi_structured(model, getattr(torch, half))
    if converted == 0:
        return Realization(None, False, None, reason="not realizable here: no 2:4 Linear met the kernel's "
                                                     f"constraints ({skipped[:3]})", details=counts)
    return Realization(sparse, True, "2:4", dtype=half,
                       details={**counts, "converted": converted, "backend": why, "skipped": skipped})


def _unstructured(model: nn.Module, device: torch.device, dtype: str, pattern: Optional[str],
                  calibration: Optional[Calibration], kernel: str) -> Realization:
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    declared = {"declared_pattern": pattern, "pattern_note": f"no {pattern} kernel here: run as unstructured"} \
        if pattern else {}
    if calibration is None:
        return Realization(None, False, None, details=declared,
                           reason=f"not calibrated: the {kernel} realizer of unstructured masks needs the input "
                                  "size, batch and threads it is timed at (no latency measured)")
    try:
        realized, details = realize_unstructured(model, kernel, device, dtype, calibration)
    except ValueError as e:              # a realization that computes something else is never timed
        return Realization(None, False, None, reason=f"not realizable here: {e}", details=declared)
    return Realization(realized, True, kernel, dtype=dtype, details={**declared, **details})


def compare_realized(dense: nn.Module, masked: nn.Module, realized: Realization, input_size: Sequence[int],
                     settings: LatencySettings, device: torch.device, pattern: Optional[str] = None,
                     calibration: Optional[Calibration] = None) -> Dict[str, dict]:
    """`compare_latency` of dense against `realized`, except that an `auto` realization is chosen again
    at each batch size other than the one it was calibrated at (the faster kernel differs with the
    batch: CSR wins more often at batch 1). Each such batch's entry records that choice
    (`realization`: summary, sparse layers, the per-layer choices)."""
    if realized.kind != "auto" or calibration is None:
        return compare_latency(dense, realized.model, input_size, settings, device)
    results: Dict[str, dict] = {}
    for batch in settings.batch_sizes:
        at_batch = realized
        if batch != calibration.batch:
            again = realize(masked, "masked", device, realized.dtype or settings.dtype, pattern,
                            calibration=replace(calibration, batch=batch), kernel="auto")
            at_batch = again if again.realizable else realized
        timed = compare_latency(dense, at_batch.model, input_size, replace(settings, batch_sizes=(batch,)), device)
        d = at_batch.details
        timed[str(batch)]["realization"] = {
            "calibrated_at_batch": d["calibration"]["batch"], "summary": d["summary"],
            "sparse_layers": d["sparse_layers"], "calibration_seconds": d["calibration"]["seconds"],
            **({"layers": d["layers"]} if at_batch is not realized else {})}
        results.update(timed)
    return results

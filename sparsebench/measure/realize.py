"""Realization: the model that is actually timed, or an honest "not realizable here".

| outcome                              | realized model                                  |
|--------------------------------------|-------------------------------------------------|
| dense                                | the dense model itself (speedup ≈ 1, a control) |
| compacted (channels/heads)           | the physically smaller dense model              |
| masked, declared 2:4 by the method   | semi-structured sparse Linear weights (fp16/bf16), only where a kernel runs |
| masked (unstructured)                | none: zeros inside dense tensors run at dense speed on stock kernels |

A 2:4 result is timed against the dense model at the same half-precision dtype. Only a method
that declares 2:4 masks (`Outcome.pattern`, the record's `sparsity_pattern`) takes the 2:4 path:
random unstructured masks satisfy 2:4 by chance often enough (density 1/32 on a 192×192 layer:
about a third of the time) that the pattern in the weights alone would mislabel them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from sparsebench.measure.sparse24 import is_2to4, semi_structured_support, to_semi_structured


@dataclass
class Realization:
    model: Optional[nn.Module]
    realizable: bool
    kind: Optional[str]             # dense | compacted | 2:4 | None
    reason: Optional[str] = None
    dtype: Optional[str] = None     # the dtype the realized model must be timed in (2:4: half precision)
    details: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"realizable": self.realizable, "kind": self.kind, "reason": self.reason, "dtype": self.dtype,
                **self.details}


def realize(model: nn.Module, realization: str, device: torch.device, dtype: str = "float32",
            pattern: Optional[str] = None) -> Realization:
    """The model to time for an outcome. `pattern` is the N:M pattern the method declared for its
    masks ("2:4"); without one a masked model is unstructured, whatever its zeros happen to look like."""
    if realization in ("dense", "compacted"):
        return Realization(model, True, realization, dtype=dtype)
    if pattern != "2:4":
        declared = f" (declared pattern {pattern}: no kernel for it here)" if pattern else ""
        return Realization(None, False, None, reason="not realizable here: unstructured zeros inside dense "
                                                     f"tensors{declared}; no sparse kernel used on {device.type}")
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

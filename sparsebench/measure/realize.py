"""Realization: the model that is actually timed, or an honest "not realizable here".

| outcome                    | realized model                              |
|----------------------------|---------------------------------------------|
| dense                      | the dense model itself (speedup ≈ 1, a control) |
| compacted (channels/heads) | the physically smaller dense model          |
| masked (unstructured)      | none: zeros inside dense tensors run at dense speed on stock kernels |
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass
class Realization:
    model: Optional[nn.Module]
    realizable: bool
    kind: Optional[str]             # dense | compacted | None
    reason: Optional[str] = None

    def as_dict(self) -> dict:
        return {"realizable": self.realizable, "kind": self.kind, "reason": self.reason}


def realize(model: nn.Module, realization: str, device: torch.device) -> Realization:
    if realization in ("dense", "compacted"):
        return Realization(model, True, realization)
    return Realization(
        None, False, None,
        reason=f"not realizable here: unstructured zeros inside dense tensors; no sparse kernel used on {device.type}",
    )

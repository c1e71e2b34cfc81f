"""The differentiable gating path: per-unit multiplicative gates on a live model.

A method that *learns* which channels, heads or neurons to keep (PASS's hypernetwork,
S²ViTE's head scores, OFB's bi-mask) needs the dense model to compute as if units were
scaled by a gate it can differentiate through. `UnitGates` installs forward hooks once, at
the same points where a `UnitSpace` applies fixed masks, and reads `values[g]` at every
forward, so the method sets new gates each step without re-hooking:

    gates = space.gate(model)                  # hooks installed, every gate 1
    gates.set([straight_through(hard, soft) for ...])
    loss = criterion(model(x), y); loss.backward()   # gradients reach `soft`
    gates.remove()

A gate of exactly 0 or 1 reproduces the fixed-mask path, so a binary gate set passes the
same compaction check as masks (`UnitSpace.check_compaction(..., via="gates")`).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import nn


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """`hard` in the forward pass, the gradient of `soft` in the backward pass.

    `soft - soft.detach()` is added last and is exactly zero, so the forward value is `hard`
    bit for bit; `(hard + soft) - soft` would round (1 + 0.7 - 0.7 != 1 in fp32)."""
    return hard.detach().to(soft.dtype) + (soft - soft.detach())


class UnitGates:
    """Per-unit gates of a `UnitSpace` on `model`; `values[g]` is None (ungated) or a
    tensor of `space.groups[g].size` gates, read at every forward."""

    def __init__(self, space, model: nn.Module):
        self.space = space
        self.values: List[Optional[torch.Tensor]] = [None] * len(space.groups)
        self._handles = space.gate_hooks(model, self)

    def set(self, values: Sequence[Optional[torch.Tensor]]) -> None:
        if len(values) != len(self.space.groups):
            raise ValueError(f"expected {len(self.space.groups)} gate tensors, got {len(values)}")
        for g, v in zip(self.space.groups, values):
            if v is not None and v.shape != (g.size,):
                raise ValueError(f"gate for a group of {g.size} units has shape {tuple(v.shape)}")
        self.values = list(values)

    def clear(self) -> None:
        self.values = [None] * len(self.space.groups)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "UnitGates":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

"""Importance scores as small objects (Torch-Pruning style): one call, scores per group.

Scoring is kept apart from selection (`UnitSpace.select`, `global_topk_masks`) and from
removal (`UnitSpace.compact`), so L1 filter pruning, random pruning, S²ViTE's Taylor
scores and PASS's hypernetwork all hand scores to the same selection code.

A *unit* is what a `UnitSpace` groups: a CNN output channel (across every conv that
produces it in a coupled residual group), a ViT attention head (its Q, K, V rows and
`proj` input columns) or an MLP neuron (its `fc1` row and `fc2` column). Each importance
returns one tensor per group of the space, higher = more important. `elementwise` scores
single weights for unstructured masks.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn

from sparsebench.training.channels import _is_depthwise


def _read(param: torch.Tensor, of: str) -> torch.Tensor:
    if of == "weight":
        return param.detach()
    if param.grad is None:
        raise RuntimeError("TaylorImportance needs gradients: run a backward pass first")
    return param.grad


def _unit_slices(model: nn.Module, space, of: str = "weight") -> List[List[torch.Tensor]]:
    """Per group, per unit-carrying tensor, a (units × rest) view of the weights (or, with
    `of="grad"`, their gradients): the pieces of each unit, in the group's unit order.

    A CNN channel's pieces are the filters that produce it: every non-depthwise conv/linear among
    the group's output members (`ChannelSpace`'s producers; Li et al.'s filters). A depthwise conv
    that carries the channel (MobileNetV2's 3×3 kernels) is a consumer of it, not a filter of it,
    and torch-pruning's magnitude importance leaves it out too."""
    from sparsebench.training.vit_units import ViTUnitSpace

    out = []
    if isinstance(space, ViTUnitSpace):
        for g in space.groups:
            blk = model.blocks[g.block]
            if g.kind == "heads":
                attn = blk.attn
                H, d, dim = attn.num_heads, attn.head_dim, attn.qkv.in_features
                qkv = _read(attn.qkv.weight, of).reshape(3, H, d, dim).permute(1, 0, 2, 3).reshape(H, -1)
                proj = _read(attn.proj.weight, of).reshape(-1, H, d).permute(1, 0, 2).reshape(H, -1)
                out.append([qkv, proj])
            else:
                out.append([_read(blk.mlp.fc1.weight, of), _read(blk.mlp.fc2.weight, of).t()])
        return out
    for g in space.groups:
        pieces = []
        for name in g.out_members:
            m = model.get_submodule(name)
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not _is_depthwise(m):
                pieces.append(_read(m.weight, of).flatten(1))
        out.append(pieces)
    return out


class Importance:
    """Scores per unit group of a space; higher keeps."""

    def __call__(self, model: nn.Module, space) -> List[torch.Tensor]:
        raise NotImplementedError

    def elementwise(self, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        raise NotImplementedError


class MagnitudeImportance(Importance):
    """‖w_unit‖_p over every tensor carrying the unit (p=1: Li et al.'s L1 filter norm,
    summed over a coupled group's producers)."""

    def __init__(self, p: float = 1.0):
        if p <= 0:
            raise ValueError(f"p must be > 0, got {p}")
        self.p = p

    @torch.no_grad()
    def __call__(self, model: nn.Module, space) -> List[torch.Tensor]:
        scores = []
        for pieces in _unit_slices(model, space):
            total = sum(w.detach().abs().pow(self.p).sum(1).float().cpu() for w in pieces)
            scores.append(total.pow(1.0 / self.p))
        return scores

    def elementwise(self, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {n: p.detach().abs() for n, p in params.items()}

    def describe(self, space) -> str:
        """The score's convention in words, for a run's record."""
        from sparsebench.training.vit_units import ViTUnitSpace

        norm = f"L{self.p:g}"
        if isinstance(space, ViTUnitSpace):
            return f"{norm} of a head's qkv rows and proj columns, of a neuron's fc1 row and fc2 column"
        return (f"{norm} of the producing filters, summed over a coupled group's convs; depthwise kernels, "
                f"norm scales and the next layers' input weights not counted")


class TaylorImportance(Importance):
    """First-order Taylor |Σ w·∂L/∂w| per unit (Molchanov et al. 2019), from the gradients
    the caller's backward pass left in `.grad`. For head outputs, the gradient of a gate on
    the gating path is the same first-order score (`UnitGates`)."""

    @torch.no_grad()
    def __call__(self, model: nn.Module, space) -> List[torch.Tensor]:
        scores = []
        for weights, grads in zip(_unit_slices(model, space), _unit_slices(model, space, of="grad")):
            total = sum((w * g).sum(1).float().cpu() for w, g in zip(weights, grads))
            scores.append(total.abs())
        return scores

    def elementwise(self, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        missing = [n for n, p in params.items() if p.grad is None]
        if missing:
            raise RuntimeError(f"TaylorImportance needs gradients; none for {missing[0]}")
        return {n: (p.detach() * p.grad).abs() for n, p in params.items()}


class RandomImportance(Importance):
    """Uniform random scores from a seeded generator (the random-pruning control)."""

    def __init__(self, generator: Optional[torch.Generator] = None):
        self.generator = generator

    def __call__(self, model: nn.Module, space) -> List[torch.Tensor]:
        return [torch.rand(g.size, generator=self.generator) for g in space.groups]

    def elementwise(self, params: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {n: torch.rand(p.shape, generator=self.generator).to(p.device) for n, p in params.items()}


class HeadOutputTaylor:
    """First-order Taylor scores of each attention head's *output*, captured on one batch.

    A forward hook on every block's `attn.proj` reads its input A (B, N, H·d), the heads'
    concatenated outputs, and registers a gradient hook on it, so this works with fused and
    unfused attention alike. With A_h and G_h = ∂L/∂A_h the slices of head h (S²ViTE, svite
    spec §3):

        taylor[h]   = mean_b |Σ_{n,d} A_h·G_h|     (prune score of an active head)
        grad_l1[h]  = mean_b  Σ_{n,d} |G_h|        (grow score; pruned heads still get G_h)

    Arm it before the forward of the batch to score (`arm()`); the scores of the last armed
    batch are in `taylor` and `grad_l1` (one tensor of H per block) after its backward.
    Unarmed, the hooks cost one flag check per block.
    """

    def __init__(self, model: nn.Module):
        self.blocks = list(model.blocks)
        self.armed = False
        self.taylor: List[Optional[torch.Tensor]] = [None] * len(self.blocks)
        self.grad_l1: List[Optional[torch.Tensor]] = [None] * len(self.blocks)
        self._handles = [blk.attn.proj.register_forward_hook(self._forward(i)) for i, blk in enumerate(self.blocks)]
        if not self._handles:
            raise ValueError("HeadOutputTaylor found no attention blocks to score")

    def _forward(self, index: int):
        def hook(module, inputs, output):
            a = inputs[0]
            if not self.armed or not a.requires_grad:
                return
            heads = self.blocks[index].attn.num_heads
            saved = a.detach()

            def on_grad(g, index=index, saved=saved, heads=heads):
                b, n, width = g.shape
                g = g.detach().float().view(b, n, heads, width // heads)
                a_h = saved.float().view(b, n, heads, width // heads)
                self.taylor[index] = (a_h * g).sum(dim=(1, 3)).abs().mean(0).cpu()
                self.grad_l1[index] = g.abs().sum(dim=(1, 3)).mean(0).cpu()

            a.register_hook(on_grad)

        return hook

    def arm(self) -> None:
        self.armed = True
        self.taylor = [None] * len(self.blocks)
        self.grad_l1 = [None] * len(self.blocks)

    def disarm(self) -> None:
        self.armed = False

    def ready(self) -> bool:
        return all(t is not None for t in self.taylor)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

"""Heads and MLP neurons of a timm ViT as prunable units, with an exact closed-form MACs model.

The ViT counterpart of `ChannelSpace`: a method scores units and `select`s kept sets under a
FLOPs budget (shared in `UnitSpace`); this module emulates the pruned model on the dense one
and exports it through the ViT slimming exporter (`sparsebench.training.vit_slim`, S²ViTE /
OFB export rules). Units, as S²ViTE's (svite spec §3):
- head h of a block: rows [h·d, (h+1)·d) of each of the Q, K and V slices of `qkv` and the
  matching input columns of `proj`;
- neuron j of a block: row j of `fc1` and column j of `fc2`.
The embedding width is not a unit here (OFB searches it; see `ViTStructure.embed`).

Pruned heads follow S²ViTE's semantics: weights gone, qkv bias live, so a pruned head
outputs its v-bias, which the export folds into `proj.bias` — masked and compacted models
agree exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn

from sparsebench.training.vit_slim import (
    BlockStructure, ViTStructure, check_supported, default_input_size, emulate_structure, num_tokens, slim_vit,
)
from sparsebench.training.channels import UnitSpace
from sparsebench.training.gates import UnitGates

UNIT_KINDS = ("heads", "mlp")


@dataclass
class UnitGroup:
    index: int
    block: int
    kind: str                       # "heads" | "mlp"
    size: int                       # units in the dense model
    unit_macs: int                  # MACs one unit costs (linear in the count: exact)

    def as_dict(self) -> dict:
        return {"block": self.block, "kind": self.kind, "size": self.size}


def head_l1_scores(model: nn.Module) -> List[torch.Tensor]:
    """Per block, the L1 norm of each head's Q, K and V rows plus its `proj` input columns."""
    scores = []
    for blk in model.blocks:
        attn = blk.attn
        H, d, dim = attn.num_heads, attn.head_dim, attn.qkv.in_features
        qkv = attn.qkv.weight.detach().abs().view(3, H, d, dim).sum(dim=(0, 2, 3))
        proj = attn.proj.weight.detach().abs().view(-1, H, d).sum(dim=(0, 2))
        scores.append((qkv + proj).cpu())
    return scores


def mlp_l1_scores(model: nn.Module) -> List[torch.Tensor]:
    """Per block, the L1 norm of each neuron's `fc1` row plus its `fc2` column."""
    return [(blk.mlp.fc1.weight.detach().abs().sum(1) + blk.mlp.fc2.weight.detach().abs().sum(0)).cpu()
            for blk in model.blocks]


class ViTUnitSpace(UnitSpace):
    """Per block a "heads" group (size H) and an "mlp" group (size hidden), in block order."""

    floor_name = "min_units"

    def __init__(self, model: nn.Module, input_size: Optional[Sequence[int]] = None, fold_bias: bool = True,
                 tokens: Optional[int] = None):
        """`tokens`: the sequence length the blocks see when fewer than every patch token
        reach them (a token selector that drops tokens before block 0); default all."""
        check_supported(model)
        self.input_size = tuple(input_size) if input_size is not None else default_input_size(model)
        self.fold_bias = fold_bias
        all_tokens = num_tokens(model, self.input_size)
        n = all_tokens if tokens is None else int(tokens)
        if not 0 < n <= all_tokens:
            raise ValueError(f"tokens must be in 1..{all_tokens}, got {tokens}")
        dim = model.embed_dim
        self.num_tokens = n
        self.groups: List[UnitGroup] = []
        for b, blk in enumerate(model.blocks):
            d = blk.attn.head_dim
            # qkv + QKᵀ and A·V (N includes the cls token, as the counter sees it) + proj
            head_macs = n * dim * 3 * d + 2 * n * n * d + n * d * dim
            self.groups.append(UnitGroup(len(self.groups), b, "heads", blk.attn.num_heads, head_macs))
            self.groups.append(UnitGroup(len(self.groups), b, "mlp", blk.mlp.fc1.out_features, 2 * n * dim))
        conv = model.patch_embed.proj
        patches = all_tokens - model.num_prefix_tokens
        self.fixed_macs = patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * dim
        if isinstance(model.head, nn.Linear):
            self.fixed_macs += dim * model.head.out_features
        self.dense_macs = self.macs([g.size for g in self.groups])

    # --- closed-form FLOPs model -------------------------------------------------------------
    def macs(self, keep: Sequence[int]) -> int:
        """MACs per image of the model slimmed to `keep[g]` units per group (== `count_macs`)."""
        return self.fixed_macs + sum(int(k) * g.unit_macs for k, g in zip(keep, self.groups))

    # --- masks, structure, compaction --------------------------------------------------------
    def to_structure(self, masks: Sequence[torch.Tensor]) -> ViTStructure:
        if len(masks) != len(self.groups):
            raise ValueError(f"expected {len(self.groups)} masks (heads, mlp per block), got {len(masks)}")
        kept = [torch.nonzero(m.bool().cpu()).flatten().tolist() for m in masks]
        return ViTStructure([BlockStructure(heads=kept[i], mlp=kept[i + 1]) for i in range(0, len(kept), 2)])

    def masks_of(self, structure: ViTStructure) -> List[torch.Tensor]:
        masks = []
        for g in self.groups:
            m = torch.zeros(g.size, dtype=torch.bool)
            m[getattr(structure.blocks[g.block], g.kind)] = True
            masks.append(m)
        return masks

    def apply_masks(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> List[torch.utils.hooks.RemovableHandle]:
        """Forward hooks making the dense model compute exactly what `compact` returns: pruned
        heads' slice of `proj`'s input set to their v-bias (the fold), pruned neurons zeroed
        at `fc2`'s input (after the activation)."""
        return emulate_structure(model, self.to_structure(masks), fold_bias=self.fold_bias)

    def gate_hooks(self, model: nn.Module, gates) -> List[torch.utils.hooks.RemovableHandle]:
        """Head gates at `proj`'s input, neuron gates at `fc2`'s input.

        A head's slice is blended toward the value a pruned head outputs (its v-bias with
        `fold_bias`, else 0): x·g + fill·(1 − g). At g ∈ {0, 1} this is exactly the fixed-mask
        path, so binary gates agree with the compacted model; in between the gradient of g
        is the first-order Taylor score of the head's output.
        """
        handles = []
        for gi, group in enumerate(self.groups):
            blk = model.blocks[group.block]
            if group.kind == "heads":
                attn = blk.attn

                def proj_pre(mod, inputs, gi=gi, attn=attn):
                    gate = gates.values[gi]
                    if gate is None:
                        return None
                    x = inputs[0]
                    H, d = attn.num_heads, attn.head_dim
                    g = gate.to(x.dtype).repeat_interleave(d)
                    if self.fold_bias and attn.qkv.bias is not None:
                        fill = attn.qkv.bias.view(3, -1)[2].to(x.dtype)
                        return (x * g + fill * (1 - g),) + tuple(inputs[1:])
                    return (x * g,) + tuple(inputs[1:])

                handles.append(attn.proj.register_forward_pre_hook(proj_pre))
            else:
                def fc2_pre(mod, inputs, gi=gi):
                    gate = gates.values[gi]
                    if gate is None:
                        return None
                    return (inputs[0] * gate.to(inputs[0].dtype),) + tuple(inputs[1:])

                handles.append(blk.mlp.fc2.register_forward_pre_hook(fc2_pre))
        return handles

    def gate_gradients(self, model: nn.Module, loss_fn) -> List[torch.Tensor]:
        """|∂L/∂g| per unit, in group order, with every gate at g = 1 (`gate_hooks`).

        The gate blends a unit's output from the value it has when pruned (a head's v-bias,
        a neuron's 0) to its output, so at g = 1 this is the first-order Taylor estimate of
        the loss change from pruning the unit, whatever the weights in place. `loss_fn(model)`
        runs the forward and returns the loss; only the gates are differentiated (parameter
        `.grad`s are untouched). One tensor per group, float, on the CPU.
        """
        device = next(model.parameters()).device
        values = [torch.ones(g.size, device=device, requires_grad=True) for g in self.groups]
        with UnitGates(self, model) as gates:
            gates.set(values)
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_fn(model), values)
        return [g.detach().abs().float().cpu() for g in grads]

    def compact(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> nn.Module:
        """A new, physically smaller stock timm ViT (`slim_vit`)."""
        return slim_vit(model, self.to_structure(masks), fold_bias=self.fold_bias)

    def structure(self, masks: Sequence[torch.Tensor]) -> dict:
        """JSON for the record; `ViTStructure.from_dict` reloads it."""
        s = self.to_structure(masks)
        return {**s.to_dict(), "summary": s.summary()}

    def describe(self) -> str:
        blocks = len(self.groups) // 2
        return f"ViT heads+mlp ({blocks} blocks, {self.num_tokens} tokens)"

    # --- scores in group order ---------------------------------------------------------------
    def l1_scores(self, model: nn.Module) -> List[torch.Tensor]:
        heads, mlp = head_l1_scores(model), mlp_l1_scores(model)
        return [heads[g.block] if g.kind == "heads" else mlp[g.block] for g in self.groups]

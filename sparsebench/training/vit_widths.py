"""Soft width masks at OFB's points of a stock timm ViT, and their export.

`ViTUnitSpace`'s gates act on whole heads (at `proj`'s input) and MLP neurons (at `fc2`'s
input). A width search over heads × per-head QKV dims, MLP neurons and the embedding
dimension (OFB, Ye et al., CVPR 2024; ofb spec §3) needs three other gating points:

- attention, per block: an (H, d) mask on the qkv output, the same on Q, K and V, bias
  included; a pruned (head, channel) is gone from q·k and from the value;
- MLP, per block: a per-neuron mask on the fc1 output, before the activation;
- embedding, global: a per-channel mask on the token sequence after pos-embed (the output
  of `norm_pre`), once, at the input; an optional `token_transform` runs right after it
  (OFB's PMIM replaces masked patch tokens there).

A hard `embed_alive` set makes dead embedding channels physically absent: every
LayerNorm over the embedding takes statistics over alive channels only, and dead channels
are zeroed where the residual stream is written (`proj`, `fc2` outputs), the dense
emulation of a slimmer residual stream (`vit_slim.emulate_structure`).

`fold_unit_scales` folds final per-unit scales into the weights, so the masked model's
function is a plain `ViTStructure` of the folded model and `slim_vit_scaled` exports a
physically smaller stock timm ViT computing exactly what the masks compute.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from sparsebench.training.vit_slim import (
    ViTStructure, _alive_layer_norm_hook, check_supported, slim_vit,
)


class ViTWidthMasks:
    """Per-unit multiplicative masks on a live timm ViT, read at every forward.

        masks = ViTWidthMasks(model)
        masks.attn[b] = m_attn          # (H, d) or None
        masks.mlp[b] = m_mlp            # (hidden,) or None
        masks.embed = m_emb             # (D,) or None
        masks.set_embed_alive(alive)    # (D,) bool or None
        masks.remove()

    With every mask None (or 1) and nothing dead this is the stock model.
    """

    def __init__(self, model: VisionTransformer):
        check_supported(model, embed_pruned=True)
        self.model = model
        depth = len(model.blocks)
        self.attn: List[Optional[torch.Tensor]] = [None] * depth
        self.mlp: List[Optional[torch.Tensor]] = [None] * depth
        self.embed: Optional[torch.Tensor] = None
        self.token_transform: Optional[Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]] = None
        self._alive_idx: Optional[torch.Tensor] = None
        self._alive: Optional[torch.Tensor] = None
        self._handles = []
        dim = model.embed_dim
        for b, blk in enumerate(model.blocks):
            self._handles.append(blk.attn.qkv.register_forward_hook(self._qkv_hook(b)))
            self._handles.append(blk.mlp.fc1.register_forward_hook(self._fc1_hook(b)))
            self._handles.append(blk.attn.proj.register_forward_hook(self._stream_hook))
            self._handles.append(blk.mlp.fc2.register_forward_hook(self._stream_hook))
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,):
                self._handles.append(m.register_forward_hook(self._norm_hook))
        # registered after norm_pre's alive-aware hook (if norm_pre is a LayerNorm): mask after it
        self._handles.append(model.norm_pre.register_forward_hook(self._embed_hook))

    # --- hooks --------------------------------------------------------------------------------
    def _qkv_hook(self, b: int):
        def hook(mod, inputs, output):
            m = self.attn[b]
            if m is None:
                return None
            return output * m.reshape(-1).to(output.dtype).repeat(3)

        return hook

    def _fc1_hook(self, b: int):
        def hook(mod, inputs, output):
            m = self.mlp[b]
            return None if m is None else output * m.to(output.dtype)

        return hook

    def _embed_hook(self, mod, inputs, output):
        x = output
        if self.embed is not None:
            x = x * self.embed.to(x.dtype)
        elif self._alive is not None:
            x = x * self._alive.to(x.dtype)
        if self.token_transform is not None:
            x = self.token_transform(x, self.embed)
        return x

    def _stream_hook(self, mod, inputs, output):
        return None if self._alive is None else output * self._alive.to(output.dtype)

    def _norm_hook(self, mod, inputs, output):
        if self._alive_idx is None:
            return None
        return _alive_layer_norm_hook(self._alive_idx)(mod, inputs, output)

    # --- state ----------------------------------------------------------------------------------
    def set_embed_alive(self, alive: Optional[torch.Tensor]) -> None:
        """Hard-kill embedding channels (None or all True: nothing dead)."""
        if alive is None or bool(alive.all()):
            self._alive = self._alive_idx = None
            return
        if alive.shape != (self.model.embed_dim,):
            raise ValueError(f"embed_alive must have shape ({self.model.embed_dim},), got {tuple(alive.shape)}")
        self._alive = alive.bool()
        self._alive_idx = torch.nonzero(self._alive).flatten()

    def clear(self) -> None:
        self.attn = [None] * len(self.attn)
        self.mlp = [None] * len(self.mlp)
        self.embed = self.token_transform = None
        self.set_embed_alive(None)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "ViTWidthMasks":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_forward_hooks_with_kwargs",
               "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _copy_without_hooks(model: nn.Module) -> nn.Module:
    # the live masks' hooks hold non-leaf tensors (and the masks object), which deepcopy rejects
    saved = {}
    for m in model.modules():
        saved[m] = {name: getattr(m, name) for name in _HOOK_DICTS if hasattr(m, name)}
        for name in saved[m]:
            setattr(m, name, type(saved[m][name])())
    try:
        return copy.deepcopy(model)
    finally:
        for m, dicts in saved.items():
            for name, d in dicts.items():
                setattr(m, name, d)


@torch.no_grad()
def fold_unit_scales(model: VisionTransformer, attn: Sequence[Optional[torch.Tensor]] = (),
                     mlp: Sequence[Optional[torch.Tensor]] = (), embed: Optional[torch.Tensor] = None
                     ) -> VisionTransformer:
    """A copy of `model` with per-unit scales (the values `ViTWidthMasks` would multiply by)
    folded into the weights: qkv rows and biases (Q, K and V alike), fc1 rows and biases, and
    the embedding (patch embed, cls/reg tokens and pos-embed; or `norm_pre`'s affine)."""
    check_supported(model, embed_pruned=embed is not None)
    folded = _copy_without_hooks(model)
    for blk, s in zip(folded.blocks, attn):
        if s is None:
            continue
        qkv = blk.attn.qkv
        flat = s.reshape(-1).to(qkv.weight)
        qkv.weight.view(3, flat.numel(), -1).mul_(flat[None, :, None])
        if qkv.bias is not None:
            qkv.bias.view(3, flat.numel()).mul_(flat[None])
    for blk, s in zip(folded.blocks, mlp):
        if s is None:
            continue
        fc1 = blk.mlp.fc1
        fc1.weight.mul_(s.to(fc1.weight)[:, None])
        if fc1.bias is not None:
            fc1.bias.mul_(s.to(fc1.bias))
    if embed is not None:
        s = embed.to(folded.pos_embed)
        if isinstance(folded.norm_pre, nn.LayerNorm):
            folded.norm_pre.weight.mul_(s)
            folded.norm_pre.bias.mul_(s)
        else:
            conv = folded.patch_embed.proj
            conv.weight.mul_(s[:, None, None, None])
            if conv.bias is not None:
                conv.bias.mul_(s)
            for name in ("cls_token", "reg_token", "pos_embed"):
                p = getattr(folded, name, None)
                if p is not None:
                    p.mul_(s)
    return folded


def slim_vit_scaled(model: VisionTransformer, structure: ViTStructure, attn: Sequence[Optional[torch.Tensor]] = (),
                    mlp: Sequence[Optional[torch.Tensor]] = (), embed: Optional[torch.Tensor] = None
                    ) -> VisionTransformer:
    """The physically smaller stock timm ViT equal to `model` under `ViTWidthMasks` holding the
    scales `attn`/`mlp`/`embed` (zero outside `structure`) and `embed_alive = structure.embed`.
    Pruned units' biases are masked with them, so nothing is folded into `proj.bias`."""
    return slim_vit(fold_unit_scales(model, attn, mlp, embed), structure, fold_bias=False)

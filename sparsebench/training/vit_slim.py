"""ViT slimming exporter: kept heads, head dims, MLP neurons and embedding channels become a
physically smaller stock timm `VisionTransformer` (measurement spec §3, "structured ViT").

Export rules, from S²ViTE (Chen et al., NeurIPS 2021; svite spec §5) and OFB (Ye et al.,
CVPR 2024; ofb spec §4):
- qkv keeps the rows of the kept (head, channel) pairs in each of its Q, K and V slices,
  weights and biases; `proj` keeps the same input columns.
- Bias fold [S²ViTE]: a pruned unit whose weights are masked but whose qkv bias is live has
  q = b_q and k = b_k at every token, so its attention is uniform and it outputs exactly
  b_v. Hence `proj.bias += W_proj[:, pruned] @ b_v[pruned]`, and a block with no kept head
  gets a `ConstantAttention`. OFB masks the bias together with the unit: export it with
  `fold_bias=False`.
- Reduced head dim kdim < d [OFB]: Q rows and Q bias are multiplied by √(kdim/d), so timm's
  1/√kdim equals the original 1/√d.
- Embedding pruning [OFB] slices the patch embedding, cls/reg tokens, pos_embed, every
  LayerNorm, LayerScale, qkv/fc1 input columns, proj/fc2 output rows and the head's input
  columns. A LayerNorm over fewer channels is *not* a masked LayerNorm: the equivalent
  dense model uses OFB's alive-aware LayerNorm (statistics over alive channels only),
  which `emulate_structure` installs.

`emulate_structure` makes the dense model compute exactly what the slim one computes
(forward hooks), so "masked == realized" can be asserted before timing (spec §2);
`vit_macs` is the closed-form MAC count of a structure, attention matmuls included, equal
to `count_macs` of the slim model.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence

import timm
import torch
import torch.nn.functional as F
from timm.layers import Attention, LayerScale, Mlp
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from sparsebench.errors import SpecError

# timm 1.0.16–1.0.22 accept `attn_head_dim` but reshape the attention output back to the
# input width, which breaks kdim·heads ≠ dim (svite spec §5.4).
MIN_TIMM = (1, 0, 23)


def _timm_version() -> tuple:
    parts = []
    for p in timm.__version__.split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


# --- the structure ----------------------------------------------------------------------------
@dataclass
class BlockStructure:
    """What one block keeps. Indices refer to the dense model.

    `head_dims[i]` lists the kept channels (within a head, 0..d-1) of the i-th kept head;
    every kept head keeps the same number (OFB ranks channels per head). None keeps all.
    A flat list of ints is shorthand for the same channels in every kept head.
    """

    heads: List[int]
    mlp: List[int]
    head_dims: Optional[List[List[int]]] = None

    def __post_init__(self):
        heads = [int(h) for h in self.heads]
        dims = self.head_dims
        if dims is not None and len(dims) and not isinstance(dims[0], (list, tuple)):
            dims = [list(dims) for _ in heads]
        if dims is not None:
            if len(dims) != len(heads):
                raise SpecError(f"head_dims has {len(dims)} entries for {len(heads)} kept heads")
            dims = [sorted(int(c) for c in d) for d in dims]
            if len({len(d) for d in dims}) > 1:
                raise SpecError(f"kept heads of a block must keep equal head dims, got {[len(d) for d in dims]}")
            if dims and not dims[0]:
                raise SpecError("a kept head keeps no channel; prune the head instead")
        # a canonical order, so equal structures compare and serialise equal
        order = sorted(range(len(heads)), key=heads.__getitem__)
        self.heads = [heads[i] for i in order]
        self.head_dims = None if dims is None else [dims[i] for i in order]
        self.mlp = sorted(int(j) for j in self.mlp)
        for name, idx in (("heads", self.heads), ("mlp", self.mlp)):
            if len(set(idx)) != len(idx):
                raise SpecError(f"duplicate indices in {name}: {idx}")

    def kdim(self, head_dim: int) -> int:
        return head_dim if self.head_dims is None or not self.head_dims else len(self.head_dims[0])

    def qkv_columns(self, head_dim: int) -> List[int]:
        """Kept positions within one of the Q, K, V slices (length H·d), in head order."""
        dims = self.head_dims or [list(range(head_dim))] * len(self.heads)
        return [h * head_dim + c for h, cs in zip(self.heads, dims) for c in cs]


@dataclass
class ViTStructure:
    """Kept units of a timm ViT: per block heads, head dims and MLP neurons; the embedding
    channels globally (None keeps all). JSON round-trips; reload = dense model → `slim_vit`
    → `load_state_dict` of the saved slim weights."""

    blocks: List[BlockStructure]
    embed: Optional[List[int]] = None

    def __post_init__(self):
        self.blocks = [b if isinstance(b, BlockStructure) else BlockStructure(**b) for b in self.blocks]
        if self.embed is not None:
            self.embed = sorted(int(c) for c in self.embed)
            if len(set(self.embed)) != len(self.embed):
                raise SpecError("duplicate indices in embed")
            if not self.embed:
                raise SpecError("embedding keeps no channel")

    @classmethod
    def dense(cls, model: VisionTransformer) -> "ViTStructure":
        return cls([BlockStructure(list(range(b.attn.num_heads)), list(range(b.mlp.fc1.out_features)))
                    for b in model.blocks])

    def to_dict(self) -> dict:
        return {"embed": self.embed,
                "blocks": [{"heads": b.heads, "head_dims": b.head_dims, "mlp": b.mlp} for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> "ViTStructure":
        # records may carry a derived "summary"; the indices alone define the structure
        return cls([BlockStructure(**b) for b in data["blocks"]], data.get("embed"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, text: str) -> "ViTStructure":
        return cls.from_dict(json.loads(text))

    def summary(self) -> dict:
        """Widths only (head_dim None = the dense head dim; 0 for a block with no heads)."""
        return {
            "heads": [len(b.heads) for b in self.blocks],
            "head_dim": [0 if not b.heads else None if b.head_dims is None else b.kdim(0) for b in self.blocks],
            "mlp": [len(b.mlp) for b in self.blocks],
            "embed_dim": None if self.embed is None else len(self.embed),
        }


# --- what the exporter supports ---------------------------------------------------------------
def check_supported(model: nn.Module, embed_pruned: bool = False) -> None:
    """Raise SpecError unless `model` is a stock timm ViT the exporter handles exactly."""
    if _timm_version() < MIN_TIMM:
        raise SpecError(f"slim_vit needs timm >= {'.'.join(map(str, MIN_TIMM))} for attn_head_dim; "
                        f"found {timm.__version__}")
    if not isinstance(model, VisionTransformer):
        raise SpecError(f"slim_vit handles timm VisionTransformer, got {type(model).__name__}")
    if model.attn_pool is not None:
        raise SpecError("attention-pool heads (global_pool='map'/'prr') are not supported")
    if not isinstance(model.head, (nn.Linear, nn.Identity)):
        raise SpecError(f"unsupported classifier {type(model.head).__name__}")
    for i, blk in enumerate(model.blocks):
        attn, mlp = getattr(blk, "attn", None), getattr(blk, "mlp", None)
        if type(blk) is not Block or type(attn) is not Attention or type(mlp) is not Mlp:
            raise SpecError(f"block {i}: only timm Block with Attention and Mlp is supported")
        if not (isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity)
                and isinstance(attn.norm, nn.Identity) and attn.gate is None):
            raise SpecError(f"block {i}: qk_norm, scale_norm and gated attention are not supported")
        if not isinstance(mlp.fc1, nn.Linear) or not isinstance(mlp.norm, nn.Identity):
            raise SpecError(f"block {i}: conv or normed MLPs are not supported")
    if embed_pruned and not isinstance(model.norm_pre, (nn.Identity, nn.LayerNorm)):
        raise SpecError("embedding pruning needs norm_pre to be Identity or LayerNorm "
                        f"(found {type(model.norm_pre).__name__})")


def _check_structure(model: VisionTransformer, structure: ViTStructure) -> None:
    if len(structure.blocks) != len(model.blocks):
        raise SpecError(f"structure has {len(structure.blocks)} blocks, model has {len(model.blocks)}")
    for i, (blk, s) in enumerate(zip(model.blocks, structure.blocks)):
        H, d, hidden = blk.attn.num_heads, blk.attn.head_dim, blk.mlp.fc1.out_features
        if any(not 0 <= h < H for h in s.heads):
            raise SpecError(f"block {i}: head index out of range 0..{H - 1}: {s.heads}")
        if s.head_dims and any(not 0 <= c < d for cs in s.head_dims for c in cs):
            raise SpecError(f"block {i}: head-dim index out of range 0..{d - 1}")
        if any(not 0 <= j < hidden for j in s.mlp):
            raise SpecError(f"block {i}: mlp index out of range 0..{hidden - 1}")
    if structure.embed is not None and any(not 0 <= c < model.embed_dim for c in structure.embed):
        raise SpecError(f"embed index out of range 0..{model.embed_dim - 1}")


# --- export -----------------------------------------------------------------------------------
class BiasOnly(nn.Module):
    """A layer whose inputs were all pruned: it outputs its bias at every token.

    Holding the constant under the layer's own name keeps its state-dict key
    (`attn.proj.bias`, `mlp.fc2.bias`) and keeps it trainable in the fine-tune; it has no
    weight, so it costs no MACs (and no zero-size Linear reaches the counters).
    """

    def __init__(self, bias: torch.Tensor):
        super().__init__()
        self.out_features = bias.shape[0]
        self.bias = nn.Parameter(bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a fresh tensor, not an expanded view of the parameter: views of leaves made under
        # no_grad carry no grad_fn, which FlopCounterMode's module tracker rejects
        return x.new_zeros(*x.shape[:-1], self.out_features) + self.bias.to(x.dtype)


class ConstantAttention(nn.Module):
    """Attention of a block whose heads were all pruned: every token gets `proj.bias`."""

    def __init__(self, bias: torch.Tensor, proj_drop: float = 0.0):
        super().__init__()
        self.num_heads, self.head_dim, self.attn_dim = 0, 0, 0
        self.proj = BiasOnly(bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False):
        return self.proj_drop(self.proj(x))


class ConstantMlp(nn.Module):
    """MLP of a block whose neurons were all pruned: every token gets `fc2.bias`."""

    def __init__(self, bias: torch.Tensor, drop: float = 0.0):
        super().__init__()
        self.fc2 = BiasOnly(bias)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(x))


def _linear(weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Linear:
    lin = nn.utils.skip_init(nn.Linear, weight.shape[1], weight.shape[0], bias=bias is not None,
                             device=weight.device, dtype=weight.dtype)
    lin.weight.data.copy_(weight)
    if bias is not None:
        lin.bias.data.copy_(bias)
    return lin


def _index(idx: Optional[Sequence[int]], device) -> Optional[torch.Tensor]:
    return None if idx is None else torch.as_tensor(list(idx), dtype=torch.long, device=device)


def _rows(t: torch.Tensor, idx: Optional[torch.Tensor], dim: int = 0) -> torch.Tensor:
    return t if idx is None else t.index_select(dim, idx)


def _slim_attention(attn: Attention, spec: BlockStructure, ke: Optional[torch.Tensor], fold_bias: bool) -> nn.Module:
    H, d = attn.num_heads, attn.head_dim
    dim = attn.qkv.in_features
    device = attn.qkv.weight.device
    kept = _index(spec.qkv_columns(d), device)
    pruned_mask = torch.ones(H * d, dtype=torch.bool, device=device)
    pruned_mask[kept] = False
    w_qkv = attn.qkv.weight.view(3, H * d, dim)
    b_qkv = None if attn.qkv.bias is None else attn.qkv.bias.view(3, H * d)
    proj_bias = None if attn.proj.bias is None else attn.proj.bias.clone()
    if fold_bias and b_qkv is not None and bool(pruned_mask.any()):
        fold = attn.proj.weight[:, pruned_mask] @ b_qkv[2, pruned_mask]
        if proj_bias is None:
            raise SpecError("bias fold needs a proj bias; export with fold_bias=False or keep a bias")
        proj_bias += fold
    if not spec.heads:
        if proj_bias is None:
            proj_bias = attn.proj.weight.new_zeros(dim)
        return ConstantAttention(_rows(proj_bias, ke), attn.proj_drop.p).train(attn.training)
    proj_bias = _rows(proj_bias, ke) if proj_bias is not None else None

    kdim = spec.kdim(d)
    q_scale = math.sqrt(kdim / d)       # timm scales by 1/√kdim; the dense model used 1/√d
    w = _rows(w_qkv.index_select(1, kept), ke, dim=2).clone()
    w[0] *= q_scale
    b = None
    if b_qkv is not None:
        b = b_qkv.index_select(1, kept).clone()
        b[0] *= q_scale
    width = len(ke) if ke is not None else dim
    new = Attention(width, num_heads=len(spec.heads), attn_head_dim=kdim, qkv_bias=b is not None,
                    proj_bias=attn.proj.bias is not None, attn_drop=attn.attn_drop.p, proj_drop=attn.proj_drop.p,
                    device=device, dtype=attn.qkv.weight.dtype)
    new.qkv.weight.copy_(w.reshape(-1, width))
    if b is not None:
        new.qkv.bias.copy_(b.reshape(-1))
    new.proj.weight.copy_(_rows(attn.proj.weight, ke).index_select(1, kept))
    if proj_bias is not None:
        new.proj.bias.copy_(proj_bias)
    new.fused_attn = attn.fused_attn
    return new.train(attn.training)


def _slim_mlp(mlp: Mlp, kept: List[int], ke: Optional[torch.Tensor]) -> nn.Module:
    fc1, fc2 = mlp.fc1, mlp.fc2
    if not kept:
        bias = fc2.bias if fc2.bias is not None else fc2.weight.new_zeros(fc2.out_features)
        return ConstantMlp(_rows(bias, ke), mlp.drop2.p).train(mlp.training)
    J = _index(kept, fc1.weight.device)
    mlp.fc1 = _linear(_rows(fc1.weight.index_select(0, J), ke, dim=1),
                      None if fc1.bias is None else fc1.bias.index_select(0, J)).train(fc1.training)
    mlp.fc2 = _linear(_rows(fc2.weight, ke).index_select(1, J),
                      None if fc2.bias is None else _rows(fc2.bias, ke)).train(fc2.training)
    return mlp


def _slim_embedding(model: VisionTransformer, ke: torch.Tensor, dense_dim: int) -> None:
    width = len(ke)
    conv = model.patch_embed.proj
    conv.weight = nn.Parameter(conv.weight.index_select(0, ke).clone())
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.index_select(0, ke).clone())
    conv.out_channels = width
    for name in ("cls_token", "reg_token", "pos_embed"):
        p = getattr(model, name, None)
        if p is not None:
            setattr(model, name, nn.Parameter(p.index_select(-1, ke).clone()))
    for m in model.modules():
        if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dense_dim,):
            m.normalized_shape = (width,)
            if m.weight is not None:
                m.weight = nn.Parameter(m.weight.index_select(0, ke).clone())
            if m.bias is not None:
                m.bias = nn.Parameter(m.bias.index_select(0, ke).clone())
        elif isinstance(m, LayerScale):
            m.gamma = nn.Parameter(m.gamma.index_select(0, ke).clone())
    if isinstance(model.head, nn.Linear):
        model.head = _linear(model.head.weight.index_select(1, ke), model.head.bias).train(model.head.training)
    model.num_features = model.head_hidden_size = model.embed_dim = width
    for info in getattr(model, "feature_info", []):
        info["num_chs"] = width


def _clear_hooks(model: nn.Module) -> None:
    # a deep copy carries the dense model's hooks (e.g. `emulate_structure`'s), whose masks
    # have the dense shapes; the exported model is a plain timm model
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
        for name in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs"):
            getattr(m, name, {}).clear()


@torch.no_grad()
def slim_vit(model: VisionTransformer, structure: ViTStructure, fold_bias: bool = True) -> VisionTransformer:
    """A new, physically smaller stock timm ViT computing what `emulate_structure` computes.

    Same state-dict keys as the dense model (a block with no kept heads keeps only
    `attn.proj.*`), smaller shapes. `fold_bias=True` follows S²ViTE (pruned units' qkv
    biases stay live and are folded into `proj.bias`); `False` follows OFB (the mask
    removes the bias too).
    """
    check_supported(model, embed_pruned=structure.embed is not None)
    _check_structure(model, structure)
    slim = copy.deepcopy(model)
    _clear_hooks(slim)
    dense_dim = model.embed_dim
    ke = None
    if structure.embed is not None and len(structure.embed) < dense_dim:
        ke = _index(structure.embed, model.cls_token.device if model.cls_token is not None
                    else next(model.parameters()).device)
    for blk, spec in zip(slim.blocks, structure.blocks):
        blk.attn = _slim_attention(blk.attn, spec, ke, fold_bias)
        blk.mlp = _slim_mlp(blk.mlp, spec.mlp, ke)
    if ke is not None:
        _slim_embedding(slim, ke, dense_dim)
    return slim


# --- dense emulation --------------------------------------------------------------------------
def _alive_layer_norm_hook(alive: torch.Tensor):
    """LayerNorm with statistics over alive channels only; dead channels output 0 (OFB §3)."""

    def hook(mod: nn.LayerNorm, inputs, output):
        x = inputs[0]
        idx = alive.to(x.device)
        w = None if mod.weight is None else mod.weight.index_select(0, idx)
        b = None if mod.bias is None else mod.bias.index_select(0, idx)
        normed = F.layer_norm(x.index_select(-1, idx), (len(idx),), w, b, mod.eps)
        return torch.zeros_like(output).index_copy(-1, idx, normed.to(output.dtype))

    return hook


def _scale_output_hook(mask: torch.Tensor):
    def hook(mod, inputs, output):
        return output * mask.to(output.device, output.dtype)

    return hook


def emulate_structure(model: VisionTransformer, structure: ViTStructure,
                      fold_bias: bool = True) -> List[torch.utils.hooks.RemovableHandle]:
    """Forward hooks that make the dense `model` compute exactly what `slim_vit` exports.

    - pruned V columns (heads and head dims): `proj`'s input is set to the value the slim
      model implies, b_v with `fold_bias` (uniform attention over a bias-only head) or 0;
    - pruned Q/K dims of kept heads are zeroed at the qkv output (dropping them from q·k,
      the dense 1/√d scale kept);
    - pruned MLP neurons are zeroed at fc2's input, i.e. after the activation;
    - pruned embedding channels: alive-aware LayerNorms, and dead channels zeroed where the
      residual stream is written (after pos-embed, at proj and fc2 outputs).
    Remove the returned handles to restore the dense model.
    """
    check_supported(model, embed_pruned=structure.embed is not None)
    _check_structure(model, structure)
    handles = []
    for blk, spec in zip(model.blocks, structure.blocks):
        attn = blk.attn
        H, d = attn.num_heads, attn.head_dim
        device = attn.qkv.weight.device
        keep = torch.zeros(H * d, dtype=torch.bool, device=device)
        keep[_index(spec.qkv_columns(d), device)] = True
        if not bool(keep.all()):
            def proj_pre(mod, inputs, keep=keep, attn=attn):
                x = inputs[0]
                if fold_bias and attn.qkv.bias is not None:
                    fill = attn.qkv.bias.view(3, -1)[2].to(x.dtype)
                else:
                    fill = x.new_zeros(())
                return (torch.where(keep, x, fill),) + tuple(inputs[1:])

            handles.append(attn.proj.register_forward_pre_hook(proj_pre))
        if spec.heads and spec.kdim(d) < d:
            qk_keep = torch.cat([keep, keep, torch.ones_like(keep)])
            handles.append(attn.qkv.register_forward_hook(_scale_output_hook(qk_keep)))
        hidden = blk.mlp.fc1.out_features
        if len(spec.mlp) < hidden:
            neuron_keep = torch.zeros(hidden, dtype=torch.bool, device=device)
            neuron_keep[_index(spec.mlp, device)] = True

            def fc2_pre(mod, inputs, neuron_keep=neuron_keep):
                return (inputs[0] * neuron_keep.to(inputs[0].dtype),) + tuple(inputs[1:])

            handles.append(blk.mlp.fc2.register_forward_pre_hook(fc2_pre))
    dim = model.embed_dim
    if structure.embed is not None and len(structure.embed) < dim:
        device = next(model.parameters()).device
        alive_idx = _index(structure.embed, device)
        alive = torch.zeros(dim, dtype=torch.bool, device=device)
        alive[alive_idx] = True
        for m in model.modules():
            if isinstance(m, nn.LayerNorm) and tuple(m.normalized_shape) == (dim,):
                handles.append(m.register_forward_hook(_alive_layer_norm_hook(alive_idx)))
        if not isinstance(model.norm_pre, nn.LayerNorm):
            # the stream entering block 0 (patch embed + cls + pos) carries dead channels
            handles.append(model.norm_pre.register_forward_hook(_scale_output_hook(alive)))
        for blk in model.blocks:
            handles.append(blk.attn.proj.register_forward_hook(_scale_output_hook(alive)))
            handles.append(blk.mlp.fc2.register_forward_hook(_scale_output_hook(alive)))
    return handles


# --- closed-form cost -------------------------------------------------------------------------
def num_tokens(model: VisionTransformer, input_size: Optional[Sequence[int]] = None) -> int:
    """Sequence length seen by the blocks (patches plus cls/reg tokens)."""
    pe = model.patch_embed
    hw = tuple(input_size[-2:]) if input_size is not None else tuple(pe.img_size)
    gh, gw = pe.dynamic_feat_size(hw)
    return gh * gw + model.num_prefix_tokens


def default_input_size(model: VisionTransformer) -> tuple:
    return (model.patch_embed.proj.in_channels, *model.patch_embed.img_size)


def vit_macs(model: VisionTransformer, structure: Optional[ViTStructure] = None,
             input_size: Optional[Sequence[int]] = None) -> int:
    """MACs per image of `slim_vit(model, structure)`, in `count_macs`'s convention: patch
    embed, qkv, QKᵀ and A·V (N incl. prefix tokens), proj, fc1, fc2, head."""
    check_supported(model)
    structure = structure or ViTStructure.dense(model)
    _check_structure(model, structure)
    input_size = tuple(input_size) if input_size is not None else default_input_size(model)
    n = num_tokens(model, input_size)
    width = model.embed_dim if structure.embed is None else len(structure.embed)
    conv = model.patch_embed.proj
    patches = n - model.num_prefix_tokens
    total = patches * conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] * width
    for blk, s in zip(model.blocks, structure.blocks):
        attn_dim = len(s.heads) * s.kdim(blk.attn.head_dim)
        total += n * width * 3 * attn_dim          # qkv
        total += 2 * n * n * attn_dim              # QKᵀ and A·V
        total += n * attn_dim * width              # proj
        total += 2 * n * width * len(s.mlp)        # fc1, fc2
    if isinstance(model.head, nn.Linear):
        total += width * model.head.out_features
    return total


def vit_params(model: VisionTransformer, structure: Optional[ViTStructure] = None) -> int:
    """Parameter count of `slim_vit(model, structure)`, from the widths alone."""
    check_supported(model)
    structure = structure or ViTStructure.dense(model)
    _check_structure(model, structure)
    D = model.embed_dim
    width = D if structure.embed is None else len(structure.embed)

    def embedding_wide(params) -> int:
        # patch embed, cls/reg/pos tokens, norms, LayerScale: one slice per embedding channel
        return sum(p.numel() // D * width for p in params)

    total = embedding_wide(p for n, p in model.named_parameters() if not n.startswith(("blocks.", "head.")))
    for blk, s in zip(model.blocks, structure.blocks):
        total += embedding_wide(p for n, p in blk.named_parameters() if n.startswith(("norm", "ls")))
        attn_dim = len(s.heads) * s.kdim(blk.attn.head_dim)
        qkv_bias, proj_bias = blk.attn.qkv.bias is not None, blk.attn.proj.bias is not None
        if attn_dim:
            total += 3 * attn_dim * (width + qkv_bias) + attn_dim * width
        total += proj_bias * width                  # kept by `ConstantAttention` too
        m = len(s.mlp)
        total += m * (width + (blk.mlp.fc1.bias is not None)) + m * width + (blk.mlp.fc2.bias is not None) * width
    if isinstance(model.head, nn.Linear):
        total += width * model.head.out_features + (model.head.bias is not None) * model.head.out_features
    return total

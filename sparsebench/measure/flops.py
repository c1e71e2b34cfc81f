"""MACs and FLOPs from torch's dispatcher-level counter, attention matmuls included.

Units (see docs/measurement.md): MACs are the multiply-accumulates of conv, linear and
matmul ops; FLOPs = 2 × MACs; element-wise ops are excluded. Counts are per image at
batch 1 and at the stated resolution.

Two pitfalls handled here:
- fused attention: on CPU, `F.scaled_dot_product_attention` dispatches to a kernel with no
  flop formula, so its MACs would vanish. We count with timm's fused attention switched
  off (restored afterwards) *and* register a formula for the CPU kernel, so a model that
  calls SDPA directly is still counted.
- sparsity: each conv/linear layer contributes nnz(W)/numel(W) of its own dense MACs
  (= nnz(W) × output positions). Attention matmuls and unmasked ops stay dense. Never
  density × total MACs.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, Iterator, Optional, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten

MATMUL_OPS = {"mm", "addmm", "bmm", "baddbmm", "matmul"}
ATTENTION_OPS = {
    "bmm", "baddbmm",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
}


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of softmax(QKᵀ)V: MACs = B·H·N_q·N_k·(d_qk + d_v)."""
    b, h, n_q, d_qk = query_shape
    n_k, d_v = key_shape[-2], value_shape[-1]
    return 2 * b * h * n_q * n_k * (d_qk + d_v)


CUSTOM_FORMULAS = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}


@contextlib.contextmanager
def unfused_attention(model: nn.Module) -> Iterator[None]:
    """Switch every module's `fused_attn` flag off for the duration, then restore it."""
    saved = [(m, m.fused_attn) for m in model.modules() if hasattr(m, "fused_attn")]
    for m, _ in saved:
        m.fused_attn = False
    try:
        yield
    finally:
        for m, flag in saved:
            m.fused_attn = flag


@dataclass
class LayerMacs:
    macs: int
    macs_effective: int
    density: float


@dataclass
class MacsReport:
    macs: int                       # dense count of the model as it is (compacted if compacted)
    macs_effective: int             # sparsity-aware: nnz-scaled conv/linear, everything else dense
    attention_macs: int             # QKᵀ and A·V matmuls (included in both totals)
    input_size: tuple               # (C, H, W) per image
    layers: Dict[str, LayerMacs] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def flops_effective(self) -> int:
        return 2 * self.macs_effective

    def as_dict(self) -> dict:
        return {
            "macs": self.macs, "flops": self.flops,
            "macs_effective": self.macs_effective, "flops_effective": self.flops_effective,
            "attention_macs": self.attention_macs, "input_size": list(self.input_size),
        }


def _prunable_leaf(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))


def count_macs(
    model: nn.Module,
    input_size: Sequence[int],
    device: Optional[torch.device] = None,
    fused_attention: bool = False,
) -> MacsReport:
    """Count MACs of one forward pass on a single image of `input_size` = (C, H, W).

    `fused_attention=True` leaves timm's fused flag as it is (for demonstrating the defect);
    the registered CPU SDPA formula still applies.
    """
    if device is None:
        device = next(model.parameters(), torch.zeros(0)).device
    x = torch.zeros(1, *input_size, device=device)
    was_training = model.training
    model.eval()
    root = type(model).__name__
    ctx = contextlib.nullcontext() if fused_attention else unfused_attention(model)
    try:
        with ctx, torch.no_grad(), FlopCounterMode(display=False, depth=None, custom_mapping=CUSTOM_FORMULAS) as counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    total_flops = sum(counts.get("Global", {}).values())

    leaf_prefixes = []
    layers: Dict[str, LayerMacs] = {}
    saved_flops = 0.0
    for name, module in model.named_modules():
        if not _prunable_leaf(module):
            continue
        key = f"{root}.{name}" if name else root
        flops = sum(counts.get(key, {}).values())
        leaf_prefixes.append(key)
        weight = module.weight
        density = float((weight != 0).sum()) / weight.numel()
        layers[name] = LayerMacs(flops // 2, int(round(flops * density)) // 2, density)
        saved_flops += flops * (1.0 - density)
    # Attention matmuls (q@kᵀ, attn@v, fused SDPA): everything of those ops not inside a conv/linear.
    def attention_ops(ops: dict) -> int:
        return sum(v for op, v in ops.items() if str(op).split(".")[-1] in ATTENTION_OPS)

    attention_flops = attention_ops(counts.get("Global", {})) - sum(attention_ops(counts.get(k, {})) for k in leaf_prefixes)
    return MacsReport(
        macs=total_flops // 2,
        macs_effective=int(round(total_flops - saved_flops)) // 2,
        attention_macs=attention_flops // 2,
        input_size=tuple(input_size),
        layers=layers,
    )


def count_params(model: nn.Module) -> dict:
    """Total and non-zero parameter counts (buffers excluded)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return {"params": total, "params_nonzero": nonzero}


# fvcore's names for the ops we count: conv, linear (addmm/linear) and matmuls (bmm, einsum).
FVCORE_MAC_OPS = ("conv", "linear", "addmm", "matmul", "bmm", "einsum")


def fvcore_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """fvcore's count of the same ops we count (conv, linear, matmul), per image, fused
    attention off: fvcore has no handle for aten::scaled_dot_product_attention and would
    silently drop it. fvcore counts one multiply-add as one "flop", i.e. MACs."""
    try:
        from fvcore.nn import FlopCountAnalysis
    except ImportError:
        raise ImportError("the fvcore cross-check needs fvcore: pip install 'sparsebench[test]'") from None
    device = next(model.parameters(), torch.zeros(0)).device
    was_training = model.training
    model.eval()
    try:
        with unfused_attention(model), torch.no_grad():
            analysis = FlopCountAnalysis(model, torch.zeros(1, *input_size, device=device))
            analysis.unsupported_ops_warnings(False)
            analysis.uncalled_modules_warnings(False)
            by_op = analysis.by_operator()
    finally:
        model.train(was_training)
    return int(sum(v for op, v in by_op.items() if op in FVCORE_MAC_OPS))

"""Unstructured masks run through sparse kernels: `csr` and `auto` (measurement spec §3).

`csr`   every eligible layer with zeros becomes a CSR × dense product (torch.sparse: MKL on CPU,
        cuSPARSE on CUDA). `nn.Linear`: y = (W_csr @ x^T)^T + b over the flattened leading dims
        (token inputs included). `nn.Conv2d` (groups=1, zero padding): the input lowered to columns
        (im2col, `F.unfold`; a reshape for a stride-1 1×1 conv) and multiplied by the CSR filter matrix.
`auto`  per layer the faster of dense and CSR, chosen by a short timed calibration at the measured
        batch and thread count, every choice recorded (layer, shape, density, kernel, both timings).
        A layer goes to CSR only when its CSR time is at most `margin` × its dense time in the
        calibration, so auto never picks a kernel slower than dense by its own measurement. Layers
        denser than `max_density` are not tried (CSR × dense loses to dense GEMM there: 0.5–0.6× at
        50 % on this project's CPU). When no layer wins, the realized model is the masked model
        itself, run dense (summary "all dense"): realizable, with a measured speedup near 1.

Each CSR layer is checked against the dense layer on the calibration input, and the realized
model against the masked model on a probe, before it is timed: a fast wrong model is a bug.
Whole zero rows (filters, neurons) cost nothing in CSR (an empty row), so they are not compacted
away separately; removing them from a dense layer would need the dependency graph (the structured
path's business) and is not done here.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from sparsebench.platform import timing_section

KERNELS = ("auto", "csr")


@dataclass(frozen=True)
class Calibration:
    """How `auto` times each layer: at `batch` inputs of `input_size`, `threads` torch threads (the
    latency measurement's), at most `max_seconds` for the whole model (layers reached after it stay
    dense, recorded as "not calibrated: time cap"). Each layer gets an equal share of what is left,
    up to `pairs` alternating dense/CSR blocks of about `block_seconds` each (at least one pair)."""

    input_size: Sequence[int]
    batch: int = 1
    threads: int = 1
    max_seconds: float = 2.0
    block_seconds: float = 0.002
    pairs: int = 5
    margin: float = 0.9
    max_density: float = 0.7
    seed: int = 0


def to_csr(weight: torch.Tensor) -> torch.Tensor:
    """`weight.to_sparse_csr()`, without torch's "CSR support is in beta" warning on every layer of every run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return weight.to_sparse_csr()


class CSRLinear(nn.Module):
    """`nn.Linear` as CSR × dense. The CSR parts are plain buffers (copy, `.to` and state dicts work
    on them); the sparse tensor is assembled per call (about 2 µs, no copy)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        csr = to_csr(linear.weight.detach())
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("crow_indices", csr.crow_indices().clone())
        self.register_buffer("col_indices", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def weight_csr(self) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_features, self.in_features), check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        columns = x.reshape(-1, self.in_features).t()            # (in, rows): the dense operand
        w = self.weight_csr()
        y = torch.mm(w, columns) if self.bias is None else torch.addmm(self.bias.unsqueeze(1), w, columns)
        return y.t().contiguous().reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.values.numel()}"


class CSRConv2d(nn.Module):
    """`nn.Conv2d` (groups=1, zero padding) lowered to a CSR product: columns = im2col(x), one
    (out, C·kh·kw) CSR × (C·kh·kw, batch·positions) matmul for the whole batch."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        why = conv_ineligible(conv)
        if why:
            raise ValueError(f"no CSR lowering for this Conv2d: {why}")
        weight = conv.weight.detach()
        self.out_channels, self.in_channels = conv.out_channels, conv.in_channels
        self.kernel_size, self.stride = tuple(conv.kernel_size), tuple(conv.stride)
        self.padding, self.dilation = tuple(conv.padding), tuple(conv.dilation)
        csr = to_csr(weight.reshape(weight.shape[0], -1))
        self.register_buffer("crow_indices", csr.crow_indices().clone())
        self.register_buffer("col_indices", csr.col_indices().clone())
        self.register_buffer("values", csr.values().clone())
        self.register_buffer("bias", None if conv.bias is None else conv.bias.detach().clone())
        self.pointwise = (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0))

    def weight_csr(self) -> torch.Tensor:
        cols = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        return torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values,
                                       (self.out_channels, cols), check_invariants=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, h, w = x.shape
        if self.pointwise:
            out_h, out_w = h, w
            columns = x.reshape(batch, self.in_channels, h * w)
        else:
            out_h, out_w = (
                (size + 2 * p - d * (k - 1) - 1) // s + 1
                for size, p, d, k, s in zip((h, w), self.padding, self.dilation, self.kernel_size, self.stride))
            columns = F.unfold(x, self.kernel_size, self.dilation, self.padding, self.stride)
        # (batch, K, L) -> (K, batch·L): one product for the whole batch
        columns = columns[0] if batch == 1 else columns.transpose(0, 1).reshape(columns.shape[1], -1)
        weight = self.weight_csr()
        y = torch.mm(weight, columns) if self.bias is None else \
            torch.addmm(self.bias.unsqueeze(1), weight, columns)
        return y.reshape(self.out_channels, batch, out_h, out_w).transpose(0, 1).contiguous()

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, nnz={self.values.numel()}")


def conv_ineligible(conv: nn.Conv2d) -> Optional[str]:
    if conv.groups != 1:
        return f"grouped convolution (groups={conv.groups})"
    if isinstance(conv.padding, str):
        return f"padding={conv.padding!r}"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    return None


def to_csr_module(module: nn.Module) -> nn.Module:
    return CSRLinear(module) if isinstance(module, nn.Linear) else CSRConv2d(module)


def _candidates(model: nn.Module) -> List[Tuple[str, nn.Module, float, Optional[str]]]:
    """(name, layer, density, why it cannot take a CSR kernel or None) for every Linear and Conv2d.
    Exact types only: a subclass (MultiheadAttention's out_proj) may be read by its parent directly."""
    out = []
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, nn.Conv2d):
            continue
        w = module.weight.detach()
        density = float((w != 0).sum()) / w.numel()
        why = conv_ineligible(module) if isinstance(module, nn.Conv2d) else None
        out.append((name, module, density, why))
    return out


def outputs_agree(a: torch.Tensor, b: torch.Tensor, tolerance: float) -> Tuple[bool, float]:
    """(agreement, max abs error): `a` equals `b` within `tolerance` scaled by the output's magnitude
    (sum order differs between kernels)."""
    err = float((a.float() - b.float()).abs().max()) if a.numel() else 0.0
    scale = max(1.0, float(b.float().abs().max()) if b.numel() else 0.0)
    return a.shape == b.shape and err <= tolerance * scale, err


def _kernel_tolerance(dtype: torch.dtype) -> float:
    """How far a CSR product may differ from the dense one in `dtype`."""
    return 1e-4 if dtype == torch.float32 else (1e-9 if dtype == torch.float64 else 2e-2)


def _time_calls(fn, x: torch.Tensor, number: int, cuda: bool) -> float:
    """Seconds per call over `number` calls."""
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(number):
        fn(x)
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / number


def realize_unstructured(model: nn.Module, kernel: str, device: torch.device, dtype: str,
                         calibration: Calibration) -> Tuple[nn.Module, dict]:
    """A copy of `model` on `device` in `dtype` with layers on CSR kernels (`kernel` "csr": every
    eligible layer with zeros; "auto": the ones that won their calibration), and the details the
    record keeps. Raises ValueError when the realized model disagrees with the masked one."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; allowed: {', '.join(KERNELS)}")
    torch_dtype = getattr(torch, dtype)
    cuda = device.type == "cuda"
    work = copy.deepcopy(model).to(device=device, dtype=torch_dtype).eval()
    candidates = _candidates(work)
    limit = 1.0 if kernel == "csr" else calibration.max_density
    layers: Dict[str, dict] = {}
    tried = {}
    for name, module, density, why in candidates:
        entry = {"layer": name, "type": type(module).__name__, "shape": list(module.weight.shape),
                 "density": density, "kernel": "dense", "dense_ms": None, "csr_ms": None, "reason": why}
        if why is None and density >= limit:
            entry["reason"] = "no zeros" if density >= 1.0 else f"density {density:.3f} ≥ {limit:g}: CSR not tried"
        elif why is None:
            tried[name] = module
        layers[name] = entry
    chosen: Dict[str, nn.Module] = {}
    state = {"deadline": None, "left": len(tried)}
    seen = set()

    def calibrate(module: nn.Module, args, output) -> None:
        name = names[id(module)]
        entry = layers[name]
        if name in seen:                                      # a layer called twice is timed once
            return
        seen.add(name)
        state["left"] -= 1
        x = args[0]
        try:
            sparse = to_csr_module(module)
            ok, err = outputs_agree(sparse(x), output, _kernel_tolerance(torch_dtype))
        except (RuntimeError, NotImplementedError) as e:      # no CSR kernel for this dtype/device
            entry["reason"] = f"CSR kernel failed: {type(e).__name__}: {str(e).splitlines()[0]}"
            return
        if not ok:
            entry["reason"] = f"CSR output disagrees with dense (max abs error {err:.3g})"
            return
        now = time.perf_counter()
        if now >= state["deadline"]:
            if kernel == "csr":
                chosen[name] = sparse
                entry.update(kernel="csr", reason="not timed: calibration time cap")
            else:
                entry["reason"] = "not calibrated: time cap"
            return
        share = (state["deadline"] - now) / (state["left"] + 1)        # an equal part of what is left
        # both through `forward`: calling the dense layer would run this hook again, and the model calls
        # either through the same `Module.__call__`
        dense_probe = _time_calls(module.forward, x, 1, cuda)
        csr_probe = _time_calls(sparse.forward, x, 1, cuda)
        number = max(1, int(calibration.block_seconds / max(min(dense_probe, csr_probe), 1e-7)))
        dense_times, csr_times = [], []
        start = time.perf_counter()
        for i in range(calibration.pairs):
            pair = ((module.forward, dense_times), (sparse.forward, csr_times))
            for fn, times in (pair if i % 2 == 0 else pair[::-1]):
                times.append(_time_calls(fn, x, number, cuda))
            if time.perf_counter() - start >= share:
                break
        dense_s, csr_s = statistics.median(dense_times), statistics.median(csr_times)
        entry.update(dense_ms=dense_s * 1e3, csr_ms=csr_s * 1e3, calls=number, blocks=len(dense_times))
        if kernel == "csr" or csr_s <= calibration.margin * dense_s:
            chosen[name] = sparse
            entry["kernel"] = "csr"

    names = {id(m): n for n, m in tried.items()}
    generator = torch.Generator().manual_seed(calibration.seed)
    x = torch.randn(calibration.batch, *calibration.input_size, generator=generator).to(device=device,
                                                                                        dtype=torch_dtype)
    probe = x[:2]
    old_threads = torch.get_num_threads()
    started = time.perf_counter()
    handles = [m.register_forward_hook(calibrate) for m in tried.values()]
    try:
        torch.set_num_threads(calibration.threads)
        with torch.inference_mode(), timing_section().exclusive():
            state["deadline"] = time.perf_counter() + calibration.max_seconds
            work(x)
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(old_threads)
    seconds = time.perf_counter() - started
    with torch.inference_mode():
        reference = work(probe)
        for name, sparse in chosen.items():
            parent, _, child = name.rpartition(".")
            setattr(work.get_submodule(parent) if parent else work, child, sparse)
        if chosen:
            ok, err = outputs_agree(work(probe), reference, _kernel_tolerance(torch_dtype))
            if not ok:
                raise ValueError(f"the {kernel} realization disagrees with the masked model "
                                 f"(max abs error {err:.3g})")
    entries = list(layers.values())
    summary = (f"{kernel}: {len(chosen)} of {len(entries)} layers on CSR" if chosen else
               f"{kernel}: all dense (no layer's CSR kernel beat dense in calibration)")
    details = {
        "summary": summary, "sparse_layers": len(chosen), "layers_total": len(entries),
        "calibration": {"batch": calibration.batch, "threads": calibration.threads,
                        "input_size": list(calibration.input_size), "seconds": seconds,
                        "max_seconds": calibration.max_seconds, "margin": calibration.margin,
                        "max_density": calibration.max_density, "device": str(device), "dtype": dtype},
        "layers": entries,
    }
    return work, details

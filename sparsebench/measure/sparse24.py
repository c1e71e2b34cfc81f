"""2:4 semi-structured sparsity: masks, runtime kernel detection, and conversion of eligible
`nn.Linear` weights to torch's semi-structured tensors (measurement spec §3, "2:4").

A 2:4 weight keeps at most 2 non-zeros in every group of 4 consecutive input weights; on
NVIDIA GPUs of compute capability ≥ 8.0 (Ampere+), cuSPARSELt or CUTLASS multiply it at up
to twice the dense rate. Only linear layers, only fp16/bf16 here, and only shapes meeting
the backend's minimum block; every skipped layer is recorded with its reason. Support is
detected by converting one layer and running one matmul, never assumed from the device
name. A 2:4 speedup is reported only when such a kernel ran (spec §5, apex ASP pitfall).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Tuple

import torch
from torch import nn

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)
GROUP = 4
KEEP = 2


def mask_2to4(weight: torch.Tensor) -> torch.Tensor:
    """Bool mask keeping the 2 largest |w| of every 4 consecutive weights along the input dim."""
    if weight.dim() != 2:
        raise ValueError(f"2:4 masks are for Linear weights (out, in); got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    if cols % GROUP:
        raise ValueError(f"input dim {cols} is not a multiple of {GROUP}")
    groups = weight.detach().abs().reshape(rows, cols // GROUP, GROUP)
    top = groups.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return mask.reshape(rows, cols)


def is_2to4(weight: torch.Tensor) -> bool:
    """At most 2 non-zeros in every group of 4 along the input dim."""
    if weight.dim() != 2 or weight.shape[1] % GROUP:
        return False
    nnz = (weight.detach() != 0).reshape(weight.shape[0], -1, GROUP).sum(-1)
    return bool((nnz <= KEEP).all())


@torch.no_grad()
def prune_2to4_(linear: nn.Linear) -> torch.Tensor:
    """Zero all but the 2 largest |w| of every 4 in place; returns the mask."""
    mask = mask_2to4(linear.weight)
    linear.weight.mul_(mask.to(linear.weight.dtype))
    return mask


def _backend_class():
    from torch.sparse import SparseSemiStructuredTensor, SparseSemiStructuredTensorCUSPARSELT
    from torch.sparse import SparseSemiStructuredTensorCUTLASS

    # torch picks cuSPARSELt unless CUTLASS is forced; mirror `to_sparse_semi_structured`
    return SparseSemiStructuredTensorCUTLASS if SparseSemiStructuredTensor._FORCE_CUTLASS \
        else SparseSemiStructuredTensorCUSPARSELT


def min_shape(dtype: torch.dtype) -> Optional[Tuple[int, int]]:
    """(rows, cols) a weight's shape must be a multiple of, for the backend torch will use."""
    constraints = getattr(_backend_class(), "_DTYPE_SHAPE_CONSTRAINTS", {}).get(dtype)
    return None if constraints is None else (constraints.sparse_min_rows, constraints.sparse_min_cols)


def _ineligible(linear: nn.Linear, dtype: torch.dtype) -> Optional[str]:
    w = linear.weight
    if not w.is_cuda:
        return f"weight on {w.device.type}, not CUDA"
    if w.dtype != dtype:
        return f"dtype {w.dtype}, expected {dtype}"
    shape = min_shape(dtype)
    if shape is None:
        return f"{dtype} not supported by the {_backend_class().BACKEND} backend"
    rows, cols = w.shape
    if rows < shape[0] or rows % shape[0] or cols < shape[1] or cols % shape[1]:
        return f"shape {tuple(w.shape)} not a multiple of the minimum block {shape}"
    if not is_2to4(w):
        return "weight is not 2:4 sparse"
    return None


def semi_structured_support(device=None, dtype: torch.dtype = torch.float16) -> Tuple[bool, str]:
    """Whether a 2:4 Linear runs (and agrees with dense) on `device`; the reason either way.

    Converts one 2:4-pruned 128×128 Linear and runs one matmul, catching every failure:
    kernels can be missing from the build or refuse the GPU even when the capability fits.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type != "cuda":
        return False, f"2:4 semi-structured kernels need a CUDA device; got {device.type}"
    if not torch.cuda.is_available():
        return False, "CUDA is not available in this torch build or on this machine"
    if dtype not in SUPPORTED_DTYPES:
        return False, f"dtype {dtype} not supported here; use one of {SUPPORTED_DTYPES}"
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if capability < MIN_CAPABILITY:
        return False, f"{name} has compute capability {capability[0]}.{capability[1]}; 2:4 needs >= 8.0"
    try:
        from torch.sparse import to_sparse_semi_structured

        torch.manual_seed(0)
        linear = nn.Linear(128, 128).to(device=device, dtype=dtype).eval()
        prune_2to4_(linear)
        x = torch.randn(64, 128, device=device, dtype=dtype)
        with torch.inference_mode():
            dense = linear(x)
            linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight), requires_grad=False)
            sparse = linear(x)
        torch.cuda.synchronize(device)
        backend = getattr(type(linear.weight), "BACKEND", type(linear.weight).__name__)
        if not torch.allclose(dense.float(), sparse.float(), rtol=1e-2, atol=1e-2):
            err = (dense.float() - sparse.float()).abs().max().item()
            return False, f"{backend} 2:4 matmul disagrees with dense (max abs error {err:.3g})"
    except Exception as exc:   # any failure means "no kernel here", recorded verbatim
        return False, f"{type(exc).__name__}: {exc}".strip()
    return True, f"{backend} on {name} (sm_{capability[0]}{capability[1]}), {dtype}"


@torch.no_grad()
def to_semi_structured(model: nn.Module, dtype: torch.dtype = torch.float16
                       ) -> Tuple[nn.Module, int, List[Tuple[str, str]]]:
    """A copy of `model` cast to `dtype`, every eligible Linear weight swapped for a semi-structured one.

    `model` itself is left as it was (`Module.to` casts in place, so the cast is made on a copy: the
    caller's dense model goes on to be timed and saved in its own dtype). Eligible: already 2:4-pruned, on
    CUDA, `dtype` in fp16/bf16, shape a multiple of the backend's minimum block. Returns
    (model, layers converted, [(name, reason)] for every Linear left dense). Inference only:
    the converted weights do not train.
    """
    from torch.sparse import to_sparse_semi_structured

    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"2:4 conversion supports {SUPPORTED_DTYPES}, got {dtype}")
    model = copy.deepcopy(model).to(dtype)
    converted, skipped = 0, []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        reason = _ineligible(module, dtype)
        if reason is None:
            try:
                module.weight = nn.Parameter(to_sparse_semi_structured(module.weight.contiguous()),
                                             requires_grad=False)
                converted += 1
                continue
            except Exception as exc:   # the layer stays dense; the record says why
                reason = f"{type(exc).__name__}: {exc}".strip()
        skipped.append((name, reason))
    return model, converted, skipped

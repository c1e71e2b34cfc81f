"""Shared unstructured-mask machinery: prunable sets, allocation, exact top-k, and a
trainer hook that keeps masks applied to weights, gradients and optimizer state.

Every unstructured method (baselines, GMP, GaP, RigL, SET, SViTE) decides masks and hands
them to one `MaskSet`; none carries its own bookkeeping.
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from sparsebench.errors import SpecError
from sparsebench.training.trainer import HookOrder, Trainer, TrainerHook

DISTRIBUTIONS = ("uniform", "erk", "er")
_OPTIMIZER_STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq")


def prunable_weights(model: nn.Module, skip_first: bool = False, skip_last: bool = False,
                     exclude: Iterable[str] = ()) -> Dict[str, nn.Parameter]:
    """Conv and linear weights in module order, keyed by parameter name.

    `skip_first` leaves the input layer dense, `skip_last` the classifier; biases and
    norms are never prunable.
    """
    exclude = set(exclude)
    items = [(f"{n}.weight" if n else "weight", m.weight) for n, m in model.named_modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and n not in exclude]
    if skip_first:
        items = items[1:]
    if skip_last:
        items = items[:-1]
    return dict(items)


def layer_densities(params: Dict[str, torch.Tensor], sparsity: float, distribution: str = "uniform",
                    erk_power: float = 1.0) -> Dict[str, float]:
    """Per-layer density for a global `sparsity` over `params`.

    uniform: every layer at 1 - s. ER / ERK (Mocanu et al.; Evci et al.):
    density_l = ε·(Σ dims)/(Π dims), ε solved so Σ density_l·N_l = (1 - s)·N; any layer
    that would exceed density 1 is made dense and ε is re-solved over the rest.
    """
    if distribution not in DISTRIBUTIONS:
        raise SpecError(f"unknown distribution {distribution!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if distribution == "uniform":
        return {n: 1.0 - sparsity for n in params}
    raw = {}
    for n, p in params.items():
        dims = list(p.shape) if distribution == "erk" else list(p.shape[:2])
        raw[n] = (sum(dims) / float(torch.tensor(dims, dtype=torch.float64).prod())) ** erk_power
    total = sum(p.numel() for p in params.values())
    dense: set = set()
    while True:
        budget = (1.0 - sparsity) * total - sum(params[n].numel() for n in dense)
        scale = sum(raw[n] * params[n].numel() for n in params if n not in dense)
        eps = budget / scale
        over = {n for n in params if n not in dense and eps * raw[n] > 1.0}
        if not over:
            break
        dense |= over
    return {n: 1.0 if n in dense else eps * raw[n] for n in params}


def keep_counts(params: Dict[str, torch.Tensor], densities: Dict[str, float]) -> Dict[str, int]:
    return {n: int(round(densities[n] * p.numel())) for n, p in params.items()}


def topk_mask(scores: torch.Tensor, keep: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Exactly `keep` True entries at the largest scores; ties broken by seeded noise.

    Percentile thresholds are inexact under ties (many exact zeros after a grow); top-k is
    exact by construction.
    """
    flat = scores.detach().flatten().double()
    if generator is not None:
        scale = flat.abs().max().clamp_min(1e-30) * 1e-9
        flat = flat + scale * torch.rand(flat.shape, generator=generator, dtype=torch.float64).to(flat.device)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask[torch.topk(flat, keep, sorted=False).indices] = True
    return mask.view_as(scores)


def global_topk_masks(scores: Dict[str, torch.Tensor], sparsity: float,
                      generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """One ranking over all tensors: exactly round((1-s)·N) entries kept overall."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten() for n in names])
    total = flat.numel()
    mask = topk_mask(flat, int(round((1.0 - sparsity) * total)), generator)
    out, offset = {}, 0
    for n in names:
        k = scores[n].numel()
        out[n] = mask[offset:offset + k].view_as(scores[n])
        offset += k
    return out


def layerwise_topk_masks(scores: Dict[str, torch.Tensor], counts: Dict[str, int],
                         generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    return {n: topk_mask(s, counts[n], generator) for n, s in scores.items()}


class MaskSet(TrainerHook):
    """Boolean masks keyed by parameter name, kept applied during training.

    - after backward: grad ⊙= mask (the dense gradient is readable before, by hooks of
      `HookOrder.READS_DENSE_GRADIENTS`, e.g. RigL);
    - after the step: w ⊙= mask and the optimizer state (momentum, Adam moments) ⊙= mask,
      so weight decay or momentum can never revive a pruned weight. It runs after every
      other hook (`HookOrder.MASKS`), so a topology update is in force before the next step.

    `version` counts mask changes (`update`, `drop`, `load_state_dict`); the trainer recomputes
    the sparse training cost only when it moves. `state_dict()` holds the masks, so a resumed
    run continues with the topology it had.
    """

    order = HookOrder.MASKS

    def __init__(self, model: nn.Module, masks: Dict[str, torch.Tensor]):
        params = dict(model.named_parameters())
        missing = [n for n in masks if n not in params]
        if missing:
            raise KeyError(f"masks name parameters the model lacks: {missing}")
        self.params = {n: params[n] for n in masks}
        self.masks = {n: m.to(device=params[n].device, dtype=torch.bool) for n, m in masks.items()}
        self.version = 0
        self._densities = None
        self.apply()

    # --- applying ------------------------------------------------------------------------
    @torch.no_grad()
    def apply(self) -> None:
        for n, p in self.params.items():
            p.mul_(self.masks[n])

    @torch.no_grad()
    def mask_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        for n, p in self.params.items():
            state = optimizer.state.get(p, {})
            for key in _OPTIMIZER_STATE_KEYS:
                if key in state:
                    state[key].mul_(self.masks[n])

    def after_backward(self, trainer: Trainer) -> None:
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    def after_step(self, trainer: Trainer) -> None:
        self.apply()
        self.mask_optimizer_state(trainer.optimizer)

    # --- changing --------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, name: str, new_mask: torch.Tensor, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Replace one mask; newly active entries start at 0 with zeroed optimizer state."""
        new_mask = new_mask.to(self.masks[name].device, torch.bool)
        grown = new_mask & ~self.masks[name]
        p = self.params[name]
        p[grown] = 0.0
        if optimizer is not None:
            state = optimizer.state.get(p, {})
            for key in _OPTIMIZER_STATE_KEYS:
                if key in state:
                    state[key][grown] = 0.0
        self.masks[name] = new_mask
        self._changed()
        p.mul_(new_mask)

    def _changed(self) -> None:
        self.version += 1
        self._densities = None

    def drop(self, names: Iterable[str]) -> None:
        """Stop masking these tensors (their zeros stay until training moves them)."""
        for n in list(names):
            self.masks.pop(n, None)
            self.params.pop(n, None)
        self._changed()

    # --- resuming and cost ---------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"masks": {n: m.clone() for n, m in self.masks.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        saved = state["masks"]
        unknown = [n for n in saved if n not in self.params]
        if unknown:
            raise KeyError(f"saved masks name tensors this MaskSet does not hold: {unknown}")
        self.params = {n: self.params[n] for n in saved}
        self.masks = {n: m.to(device=self.params[n].device, dtype=torch.bool) for n, m in saved.items()}
        self._changed()

    def masked_densities(self) -> Dict[int, float]:
        if self._densities is None:
            self._densities = {id(self.params[n]): float(m.sum()) / m.numel() for n, m in self.masks.items()}
        return self._densities

    # --- reporting -------------------------------------------------------------------------
    def nnz(self) -> Dict[str, int]:
        return {n: int(m.sum()) for n, m in self.masks.items()}

    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return 1.0 - sum(self.nnz().values()) / max(1, total)

    def layer_sparsity(self) -> Dict[str, float]:
        return {n: 1.0 - float(m.sum()) / m.numel() for n, m in self.masks.items()}

    def names(self) -> List[str]:
        return list(self.masks)

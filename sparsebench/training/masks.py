"""Shared unstructured-mask machinery: prunable sets, allocation, exact top-k, and a
trainer hook that keeps masks applied to weights, gradients and optimizer state.

Every unstructured method (baselines, GMP, GaP, RigL, SET, SViTE) decides masks and hands
them to one `MaskSet`; none carries its own bookkeeping.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional

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
                      generator: Optional[torch.Generator] = None, keep: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """One ranking over all tensors: exactly round((1-s)·N) entries (or `keep`) kept overall."""
    names = list(scores)
    flat = torch.cat([scores[n].detach().flatten() for n in names])
    total = flat.numel()
    mask = topk_mask(flat, int(round((1.0 - sparsity) * total)) if keep is None else keep, generator)
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

    def __init__(self, model: nn.Module, masks: Dict[str, torch.Tensor], weights_only: bool = False):
        """`weights_only=True` reproduces official code that masks weights after the step
        but neither gradients nor optimizer state (an ablation, e.g. GaP's `faithful_masking`)."""
        self.weights_only = weights_only
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
        if self.weights_only:
            return
        for n, p in self.params.items():
            if p.grad is not None:
                p.grad.mul_(self.masks[n])

    def after_step(self, trainer: Trainer) -> None:
        self.apply()
        if not self.weights_only:
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


def kept_change(before: Mapping[Any, torch.Tensor], after: Mapping[Any, torch.Tensor]) -> float:
    """Fraction of the kept set `after` that was not kept `before` (0: the same kept set, e.g. a
    prune-back that restored the old mask; 1: every kept entry is new). Masks are matched by key."""
    kept = sum(int(m.sum()) for m in after.values())
    new = sum(int((m & ~before[n]).sum()) for n, m in after.items())
    return new / kept if kept else 0.0


# --- weights of masked entries, kept aside ---------------------------------------------------
class ShadowWeights:
    """The last active values of masked weights, kept aside while their entries are masked.

    A `MaskSet` zeroes an entry when it is pruned; a growth criterion that asks what an
    inactive unit *would* do (S²ViTE's `grow="revival"` ablation) needs its weights back.
    `record(masks)` copies every currently active entry into the shadow (so an entry's shadow
    is its value at the last record before it was pruned; entries never active keep their
    value at construction, i.e. the weights before the initial masks were applied);
    `revived(masks)` temporarily puts the shadow values into the inactive entries (exact
    restore on exit); `restore(name, entries)` writes the shadow into entries being regrown.
    """

    def __init__(self, params: Dict[str, torch.Tensor]):
        """`params`: name → parameter, read now (before any mask is applied)."""
        self.params = dict(params)
        self.values = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def record(self, masks: "MaskSet") -> None:
        for n, p in self.params.items():
            m = masks.masks[n]
            self.values[n] = torch.where(m, p.detach(), self.values[n])

    @torch.no_grad()
    def restore(self, name: str, entries: torch.Tensor) -> None:
        p = self.params[name]
        p[entries] = self.values[name][entries].to(p.dtype)

    @contextlib.contextmanager
    def revived(self, masks: "MaskSet"):
        saved = {n: p.detach().clone() for n, p in self.params.items()}
        try:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(torch.where(masks.masks[n], p, self.values[n].to(p.dtype)))
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(saved[n])

    def state_dict(self) -> dict:
        return {n: v.clone() for n, v in self.values.items()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) ^ set(self.values)
        if unknown:
            raise KeyError(f"shadow weights do not match: {sorted(unknown)}")
        self.values = {n: state[n].clone().to(self.values[n].device) for n in self.values}


# --- initial masks ---------------------------------------------------------------------------
def initial_masks(params: Dict[str, torch.Tensor], sparsity: float, distribution: str = "uniform",
                  criterion: str = "random", generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
    """Masks at `sparsity` over `params`, exact per-layer counts.

    distribution: `uniform` | `er` | `erk` (per-layer densities, `layer_densities`) or `global`
    (per-layer counts from one global |w| ranking of these weights). criterion: `random`
    (uniform among each layer's entries) or `magnitude` (largest |w| kept).
    """
    if criterion not in ("random", "magnitude"):
        raise SpecError(f"unknown mask criterion {criterion!r}; allowed: random, magnitude")
    magnitudes = {n: p.detach().abs() for n, p in params.items()}
    if distribution == "global":
        counts = {n: int(m.sum()) for n, m in global_topk_masks(magnitudes, sparsity, generator).items()}
    else:
        counts = keep_counts(params, layer_densities(params, sparsity, distribution))
    if criterion == "random":
        scores = {n: torch.rand(p.shape, generator=generator).to(p.device) for n, p in params.items()}
    else:
        scores = magnitudes
    return layerwise_topk_masks(scores, counts, generator)


# --- dynamic sparse training: prune and grow (RigL, SET; reused by GaP and SViTE) -----------------
# When topology updates happen (RigL, SET, SViTE, S²ViTE). The official schedules assume long
# runs: RigL updates every 100 steps of ~32k-100k, SViTE every ~1 % of training (≈80 updates).
# Our budgets are a few hundred steps, where "every 100 steps" gives 1–3 updates that each swap
# a third of the network, and "1 %" an update every 3 steps, before the weights or the gradient
# estimate have moved. Rule [reconstructed, the same for every dynamic method]: take the
# official interval, shorten it until at least MIN_UPDATES updates fit before t_end, never below
# MIN_UPDATE_INTERVAL steps (on a budget under MIN_UPDATE_INTERVAL·MIN_UPDATES steps the interval
# wins: fewer updates, each still after meaningful training).
MIN_UPDATE_INTERVAL = 10     # optimizer steps between two updates: ten batches of weight and gradient movement
MIN_UPDATES = 20             # updates in a run: no handful of updates each swapping a large part of the network


def update_interval(t_end: int, official: int, every: Optional[int] = None,
                    min_interval: int = MIN_UPDATE_INTERVAL, min_updates: int = MIN_UPDATES) -> int:
    """ΔT in optimizer steps for updates at steps ΔT, 2ΔT, ... < `t_end`.

    `every`: an explicit interval, used as given where one update fits before `t_end`; one that does
    not becomes the last step before `t_end` (one update), which the method records and says
    (`MethodContext.adjusted`). Otherwise `official` (the paper's interval
    scaled to this run, in steps) shortened to ⌊t_end / min_updates⌋ when that is smaller,
    never below `min_interval`, and never so long that no update fits before `t_end`.
    """
    if every is None:
        every = max(min_interval, min(official, t_end // min_updates))
    last = t_end - 1                                   # the last step at which an update may run
    return max(1, min(every, last)) if last >= 1 else max(1, every)


def cosine_drop_fraction(step: int, alpha: float, t_end: int) -> float:
    """RigL's drop fraction f(t) = α/2·(1 + cos(π·t/T_end)); 0 at and after T_end."""
    if step >= t_end:
        return 0.0
    return 0.5 * alpha * (1.0 + math.cos(math.pi * step / t_end))


def drop_and_grow(mask: torch.Tensor, weight: torch.Tensor, grow_scores: torch.Tensor, k: int,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One tensor's new mask: drop the k active entries of smallest |w|, then grow the k
    entries of largest `grow_scores` (non-negative) among those inactive after the drop (RigL's official
    order, so a just-dropped weight may be regrown). nnz is unchanged; ties are broken by
    seeded noise, so counts are exact.
    """
    n_active = int(mask.sum())
    k = swap_size(mask, k)
    if k == 0:
        return mask.clone()
    # |w| and grow scores are >= 0, so -1 ranks an excluded entry below every candidate
    keep_scores = torch.where(mask, weight.detach().abs().double(), -1.0)
    kept = topk_mask(keep_scores, n_active - k, generator) & mask
    grow = torch.where(kept, -1.0, grow_scores.detach().double())
    grown = topk_mask(grow, k, generator) & ~kept
    return kept | grown


def swap_size(mask: torch.Tensor, k: int) -> int:
    """How many entries `drop_and_grow` really swaps for a requested k: never more than are
    active, nor more than are inactive."""
    n_active = int(mask.sum())
    return max(0, min(k, n_active, mask.numel() - n_active))


def prune_and_grow(masks: "MaskSet", fraction: float, grow_scores: Dict[str, torch.Tensor],
                   optimizer: Optional[torch.optim.Optimizer] = None,
                   generator: Optional[torch.Generator] = None, rounding: str = "floor",
                   swapped: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Apply `drop_and_grow` to every tensor of `masks` with k = ⌊fraction·n_active⌋
    (`rounding="ceil"`: ⌈fraction·n_active⌉, SViTE's, which swaps ≥ 1 entry per layer while
    fraction > 0).

    Grown weights start at 0 with zeroed optimizer state (`MaskSet.update`); dropped weights
    and their optimizer state are zeroed. Returns the number of entries moved per tensor
    (grown where the mask was inactive before the drop); `swapped`, if given, receives the
    number dropped-and-regrown per tensor (a just-dropped entry that is regrown counts here,
    not as moved).
    """
    if rounding not in ("floor", "ceil"):
        raise ValueError(f"rounding must be 'floor' or 'ceil', got {rounding!r}")
    round_k = math.floor if rounding == "floor" else math.ceil
    moved = {}
    for name, mask in list(masks.masks.items()):
        k = int(round_k(fraction * int(mask.sum())))
        new = drop_and_grow(mask, masks.params[name], grow_scores[name], k, generator)
        moved[name] = int((new & ~mask).sum())
        if swapped is not None:
            swapped[name] = swap_size(mask, k)
        masks.update(name, new, optimizer)
    if optimizer is not None:
        masks.mask_optimizer_state(optimizer)
    return moved


GROW_CRITERIA = ("gradient", "random")


class DynamicSparsity(TrainerHook):
    """Topology updates of dynamic sparse training as a trainer hook (RigL; SET with `grow="random"`).

    Every `delta_t` optimizer steps while t < `t_end`, each masked tensor drops
    k = ⌊f(t)·n_active⌋ weights by magnitude and grows k by the grow criterion:
    `gradient` (|∂L/∂w| of the current batch, read dense before `MaskSet` masks it, hence
    `order = READS_DENSE_GRADIENTS`) or `random`. f defaults to `cosine_drop_fraction`;
    pass `drop_fraction=lambda t: ζ` for a constant one. The update runs in `after_step`
    (after the optimizer step of the update iteration), before `MaskSet` re-applies masks.
    `grow_init` "zero" (RigL, default SET) or "random" (original SET: new weights drawn
    from N(0, std of the layer's surviving weights)). `rounding`: k = ⌊·⌋ (RigL) or ⌈·⌉ (SViTE).

    `updates=False` is static sparse training (a null control): the same hook, masks and
    telemetry, but no update ever runs.

    Telemetry: every update appends to `history` (step, drop fraction, `swapped` = weights
    dropped and regrown, `regrown_new` = of those, grown where the mask was inactive just
    before the drop) and marks a `topology` event on the trainer's curve; `telemetry()`
    sums them up. History, generator and the initial masks are in `state_dict`, so a
    resumed run updates, and reports, exactly as an uninterrupted one.
    """

    order = HookOrder.READS_DENSE_GRADIENTS

    def __init__(self, masks: "MaskSet", delta_t: int, t_end: int, alpha: float = 0.3, grow: str = "gradient",
                 generator: Optional[torch.Generator] = None,
                 drop_fraction: Optional[Callable[[int], float]] = None, grow_init: str = "zero",
                 rounding: str = "floor", updates: bool = True):
        if grow not in GROW_CRITERIA:
            raise SpecError(f"unknown grow criterion {grow!r}; allowed: {', '.join(GROW_CRITERIA)}")
        if grow_init not in ("zero", "random"):
            raise SpecError(f"unknown grow_init {grow_init!r}; allowed: zero, random")
        if delta_t < 1:
            raise SpecError(f"delta_t must be >= 1, got {delta_t}")
        self.masks, self.delta_t, self.t_end, self.alpha, self.grow = masks, delta_t, t_end, alpha, grow
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.drop_fraction = drop_fraction or (lambda t: cosine_drop_fraction(t, alpha, t_end))
        self.grow_init = grow_init
        self.rounding = rounding
        self.updates = updates
        self.initial = {n: m.clone() for n, m in masks.masks.items()}
        self._gradients: Optional[Dict[str, torch.Tensor]] = None
        self.history: List[dict] = []

    def is_update_step(self, step: int) -> bool:
        """Whether the topology changes after optimizer step `step` (counted from 1)."""
        return self.updates and step % self.delta_t == 0 and step < self.t_end

    def after_backward(self, trainer: Trainer) -> None:
        if self.grow == "gradient" and self.is_update_step(trainer.step + 1):
            self._gradients = {n: (p.grad.detach().abs().clone() if p.grad is not None else torch.zeros_like(p))
                               for n, p in self.masks.params.items()}

    def after_step(self, trainer: Trainer) -> None:
        if not self.is_update_step(trainer.step):
            return
        self.update(trainer.step, trainer.optimizer)
        last = self.history[-1]
        trainer.event("topology", swapped=last["swapped"], regrown_new=last["moved"],
                      drop_fraction=last["drop_fraction"])

    @torch.no_grad()
    def update(self, step: int, optimizer: Optional[torch.optim.Optimizer] = None,
               gradients: Optional[Dict[str, torch.Tensor]] = None) -> Dict[str, int]:
        if self.grow == "gradient":
            scores = gradients if gradients is not None else self._gradients
            if scores is None:
                raise RuntimeError("gradient growth needs the dense gradient of the update step")
        else:
            scores = {n: torch.rand(p.shape, generator=self.generator).to(p.device)
                      for n, p in self.masks.params.items()}
        fraction = self.drop_fraction(step)
        before = {n: m.clone() for n, m in self.masks.masks.items()} if self.grow_init == "random" else None
        swapped: Dict[str, int] = {}
        moved = prune_and_grow(self.masks, fraction, scores, optimizer, self.generator, self.rounding, swapped)
        if before is not None:
            for n, p in self.masks.params.items():
                grown = self.masks.masks[n] & ~before[n]
                alive = p[self.masks.masks[n] & ~grown]
                std = float(alive.std()) if alive.numel() > 1 else 0.0
                p[grown] = torch.randn(int(grown.sum()), generator=self.generator).to(p) * std
        self._gradients = None
        self.history.append({"step": step, "drop_fraction": fraction, "swapped": sum(swapped.values()),
                             "moved": sum(moved.values())})
        return moved

    def telemetry(self) -> Dict[str, object]:
        """What the topology updates did: counts per update and in total, the share of swapped
        weights regrown at new positions, and `mask_changed`, the fraction of the active set
        now at positions the initial mask did not hold (net topology change)."""
        swapped = [int(h["swapped"]) for h in self.history]
        new = [int(h["moved"]) for h in self.history]
        active = sum(int(m.sum()) for m in self.masks.masks.values())
        return {
            "updates": len(self.history),
            "update_steps": [int(h["step"]) for h in self.history],
            "swapped": swapped, "regrown_new": new,
            "swapped_total": sum(swapped), "regrown_new_total": sum(new),
            "regrown_new_share": round(sum(new) / sum(swapped), 4) if sum(swapped) else 0.0,
            "active": active,
            "mask_changed": round(kept_change(self.initial, self.masks.masks), 4),
        }

    def state_dict(self) -> dict:
        return {"history": [dict(h) for h in self.history], "generator": self.generator.get_state(),
                "initial": {n: m.clone() for n, m in self.initial.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(h) for h in state["history"]]
        self.generator.set_state(state["generator"])
        self.initial = {n: m.to(self.masks.masks[n].device) for n, m in state["initial"].items()}

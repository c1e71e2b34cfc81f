"""Mask-based sparse training: GMP, RigL and SET.

**GMP** — gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Training starts dense. At t = t0, t0+Δt, ..., t0+nΔt the sparsity is raised along a cubic
schedule, s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(nΔt))³, and the smallest-|w| weights are
masked (per layer, or globally). Pruned weights stay zero; the learning rate keeps
decaying after the pruning window. The harness fine-tune, masks fixed, follows.

**RigL** (Evci et al. 2020, "Rigging the Lottery") and **SET** (Mocanu et al. 2018) train
sparse from scratch at constant per-layer density, starting from random ERK masks. Every
ΔT steps while t < T_end, each layer drops k = ⌊f(t)·n_active⌋ of its smallest-|w| weights
and grows k: RigL by the largest dense-gradient magnitude, SET at random. f is RigL's
cosine f(t) = α/2·(1 + cos(π t / T_end)); grown weights start at 0 with zeroed optimizer
state. The machinery (`DynamicSparsity`, `prune_and_grow`) lives in `training.masks`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional

import torch

from sparsebench.errors import SpecError
from sparsebench.training.trainer import Trainer, TrainerHook
from sparsebench.training.masks import (
    DynamicSparsity, MaskSet, global_topk_masks, initial_masks, keep_counts, layer_densities, layerwise_topk_masks,
    prunable_weights, update_interval,
)
from sparsebench.methods.base import (
    Method, MethodContext, Outcome, apply_layer_set, judge_mechanism, layer_set_note, layers_field,
    register_method,
)


def cubic_sparsity(t: int, s_initial: float, s_final: float, t0: int, span: int) -> float:
    """Zhu & Gupta's schedule; constant s_initial before t0 and s_final after t0 + span."""
    if t <= t0:
        return s_initial
    progress = min(1.0, (t - t0) / span)
    return s_final + (s_initial - s_final) * (1.0 - progress) ** 3


class GradualPruning(TrainerHook):
    def __init__(self, masks: MaskSet, prune_steps: List[int], schedule, scope: str, generator,
                 distribution: str = "uniform"):
        self.masks, self.prune_steps, self.schedule = masks, set(prune_steps), schedule
        self.scope, self.generator, self.distribution = scope, generator, distribution
        self.history: List[dict] = []

    def state_dict(self) -> dict:
        return {"history": list(self.history), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state["history"])
        self.generator.set_state(state["generator"])

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step not in self.prune_steps:
            return
        sparsity = self.schedule(trainer.step)
        params = self.masks.params
        scores = {n: p.detach().abs() for n, p in params.items()}
        if self.scope == "global":
            new = global_topk_masks(scores, sparsity, self.generator)
        else:
            densities = layer_densities(params, sparsity, self.distribution)
            new = layerwise_topk_masks(scores, keep_counts(params, densities), self.generator)
        for n, m in new.items():
            self.masks.update(n, m, trainer.optimizer)
        self.masks.mask_optimizer_state(trainer.optimizer)
        self.history.append({"step": trainer.step, "target": sparsity, "sparsity": self.masks.sparsity()})


@register_method("gmp")
class GMP(Method):
    """Gradual magnitude pruning with the cubic schedule (Zhu & Gupta 2017).

    No declared mechanism or null control: the schedule is its criterion (a baseline-like
    method; its record says "no mechanism"), and switching the schedule off leaves one-shot
    magnitude pruning, which the benchmark runs as its own baseline."""

    granularity = "unstructured"

    @dataclass(frozen=True)
    class Config:
        scope: Literal["layer", "global"] = "layer"
        # per-layer sparsity when scope="layer": uniform (Zhu & Gupta) or ERK (the densities RigL
        # and GaP at distribution=erk keep, so all compare at one distribution)
        distribution: Literal["uniform", "erk"] = "uniform"
        initial_sparsity: float = 0.0
        start_fraction: float = 0.1      # t0 as a fraction of the step budget
        end_fraction: float = 0.75       # t0 + nΔt
        delta_t: Optional[int] = None    # steps between prunes; None: 100, capped to give ≥ 10 prunes
        from_pretrained: bool = False
        skip_first: bool = True        # input layer and classifier dense, as in GaP and ShrinkBench
        skip_last: bool = True
        layers: Literal["benchmark", "official"] = layers_field()   # "official": RigL's set, see methods.base

        def __post_init__(self):
            apply_layer_set(self)
            if self.scope == "global" and self.distribution != "uniform":
                raise ValueError(f"distribution={self.distribution!r} sets per-layer sparsity; it needs "
                                 f"scope='layer' (scope='global' ranks all weights together)")
            if not 0.0 <= self.start_fraction < self.end_fraction <= 1.0:
                raise ValueError(f"need 0 <= start_fraction < end_fraction <= 1, got "
                                 f"{self.start_fraction}, {self.end_fraction}")

    @property
    def starts_from(self) -> str:
        return "pretrained" if self.config.from_pretrained else "scratch"

    def schedule_steps(self, budget: int) -> tuple:
        cfg = self.config
        t0 = max(1, int(round(cfg.start_fraction * budget)))
        t_end = max(t0 + 1, int(round(cfg.end_fraction * budget)))
        delta = cfg.delta_t or max(1, min(100, (t_end - t0) // 10))
        n = max(1, (t_end - t0) // delta)
        return t0, delta, n

    def run(self, ctx: MethodContext) -> Outcome:
        cfg = self.config
        budget = ctx.budget.left
        if budget < 2:
            raise SpecError(f"gmp needs a step budget of at least 2, got {budget}")
        t0, delta, n = self.schedule_steps(budget)
        s_final = ctx.target.value
        params = prunable_weights(ctx.model, exclude=ctx.dense_layers(cfg.skip_first, cfg.skip_last))
        masks = MaskSet(ctx.model, {k: torch.ones_like(p, dtype=torch.bool) for k, p in params.items()})
        pruning = GradualPruning(
            masks, [t0 + i * delta for i in range(n + 1)],
            lambda t: cubic_sparsity(t, cfg.initial_sparsity, s_final, t0, n * delta),
            cfg.scope, torch.Generator().manual_seed(ctx.seed), cfg.distribution,
        )
        trainer = ctx.make_trainer(hooks=[pruning, masks])
        trainer.fit(budget, progress=ctx.progress, desc="gmp")
        return Outcome(model=ctx.model, realization="masked", masks=masks, prunable=list(params),
                       notes={"schedule": {"t0": t0, "delta_t": delta, "n": n}, "prune_history": pruning.history,
                              "layers": layer_set_note(cfg.layers, cfg.skip_first, cfg.skip_last),
                              "layer_sparsity": masks.layer_sparsity()})


def resolve_skips(skip_first: Optional[bool], skip_last: Optional[bool]) -> tuple:
    """Stem and classifier stay dense unless set explicitly, whatever the distribution.

    Deviation, on purpose: RigL's official scripts leave only the first layer dense and prune
    the classifier with the rest (ImageNet `first_layer_sparsity=0`, `last_layer_sparsity=-1`,
    i.e. ERK's own density; CIFAR `prune_first_layer=False`). The benchmark states every
    unstructured target over one prunable set (input layer and classifier dense, as GaP's CV
    code and ShrinkBench do), so methods compare at equal sparsity of the same weights: on
    deit_tiny at 0.9 RigL's head is at density 0.090 where ours is dense, overall density
    0.124 vs 0.154. `layers=official` (= `skip_first=true skip_last=false`) is RigL's set."""
    return (True if skip_first is None else skip_first, True if skip_last is None else skip_last)


@dataclass(frozen=True)
class DynamicSparseConfig:
    alpha: float = 0.3                    # α, initial drop fraction
    delta_t: Optional[int] = None         # ΔT, steps between updates; None: RigL's 100, by `update_interval`'s rule
    end_fraction: float = 0.75            # T_end as a fraction of the step budget
    grow: Literal["gradient", "random"] = "gradient"
    distribution: Literal["uniform", "er", "erk"] = "erk"
    skip_first: Optional[bool] = None     # None: True (input layer dense), see resolve_skips
    skip_last: Optional[bool] = None      # None: True (classifier dense); RigL's scripts prune it
    layers: Literal["benchmark", "official"] = layers_field()   # "official": RigL's set, see methods.base
    # False: the null control, static sparse training (same ERK masks, budget and fine-tune, no update)
    topology_updates: bool = True
    # RigL's extended-training rows (its Table 2: 1×, 2×, 5×): train for this multiple of the
    # protocol's step budget. Costs more training MACs, which the record and the leaderboard's
    # equal-cost views show; 1 is the protocol's equal-steps setting.
    budget_multiplier: float = 1.0

    def __post_init__(self):
        apply_layer_set(self)
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha}")
        if not 0.0 < self.end_fraction <= 1.0:
            raise ValueError(f"end_fraction must be in (0, 1], got {self.end_fraction}")
        if self.delta_t is not None and self.delta_t < 1:
            raise ValueError(f"delta_t must be >= 1, got {self.delta_t}")
        if not 0.0 < self.budget_multiplier <= 100.0:
            raise ValueError(f"budget_multiplier must be in (0, 100], got {self.budget_multiplier}")


class _DynamicSparseTraining(Method):
    """Mechanism: the topology updates. Telemetry (`DynamicSparsity.telemetry`): per update the
    weights swapped (dropped and regrown) and those regrown at new positions; `mask_changed`,
    the fraction of the final active set the initial random mask did not hold. It acted when
    at least one update ran and `mask_changed` >= 0.01 (1 % of the kept weights moved: an
    update that only regrows what it dropped changes nothing). Null control:
    `topology_updates=False`, static sparse training from the same masks."""

    granularity = "unstructured"
    starts_from = "scratch"
    Config = DynamicSparseConfig
    null_control = {"topology_updates": False}
    mechanism_thresholds = {"updates": 1, "mask_changed": 0.01}

    official_delta_t = 100                # RigL's ΔT on CIFAR and ImageNet [official code]

    @property
    def budget_scale(self) -> float:
        return self.config.budget_multiplier

    def schedule(self, budget: int, steps_per_epoch: int) -> tuple:
        """(ΔT, T_end) in optimizer steps of this run's budget; ΔT by the shared rule
        (`training.masks.update_interval`: ≥ 20 updates where ≥ 10 steps apart allow it) on the
        protocol's 1× budget. As in RigL's `training_steps_multiplier`, extended training
        stretches the run, its learning-rate schedule and T_end, not ΔT: a 2× run makes twice
        as many updates."""
        cfg = self.config
        t_end = max(1, int(cfg.end_fraction * budget))
        t_end_at_1x = max(1, int(cfg.end_fraction * budget / cfg.budget_multiplier))
        delta = update_interval(t_end_at_1x, self.official_delta_t, cfg.delta_t)
        return min(delta, max(1, t_end - 1)), t_end

    def topology_hook(self, masks: MaskSet, delta: int, t_end: int, generator) -> DynamicSparsity:
        cfg = self.config
        return DynamicSparsity(masks, delta, t_end, cfg.alpha, cfg.grow, generator, updates=cfg.topology_updates)

    def run(self, ctx: MethodContext) -> Outcome:
        cfg = self.config
        budget = ctx.budget.left
        if budget < 1:
            raise SpecError(f"{self.name} needs a step budget of at least 1, got {budget}")
        skip_first, skip_last = resolve_skips(cfg.skip_first, cfg.skip_last)
        params = prunable_weights(ctx.model, exclude=ctx.dense_layers(skip_first, skip_last))
        generator = torch.Generator().manual_seed(ctx.seed)
        masks = MaskSet(ctx.model, initial_masks(params, ctx.target.value, cfg.distribution, "random", generator))
        delta, t_end = self.schedule(budget, len(ctx.train_loader))
        if cfg.delta_t is not None and delta != cfg.delta_t:     # too long for one update before T_end
            ctx.adjusted("delta_t", cfg.delta_t, delta,
                         f">= {delta + 1}, the update schedule's T_end (end_fraction {cfg.end_fraction:g} of "
                         f"{budget} steps): one update, at step {delta}")
        topology = self.topology_hook(masks, delta, t_end, generator)
        trainer = ctx.make_trainer(hooks=[topology, masks])
        trainer.fit(budget, progress=ctx.progress, desc=self.name)
        return Outcome(model=ctx.model, realization="masked", masks=masks, prunable=list(params),
                       notes={"schedule": {"delta_t": delta, "t_end": t_end, "alpha": cfg.alpha, "grow": cfg.grow,
                                           "updates_planned": len(range(delta, t_end, delta)),
                                           "budget_multiplier": cfg.budget_multiplier},
                              "distribution": cfg.distribution, "skip_first": skip_first, "skip_last": skip_last,
                              "layers": layer_set_note(cfg.layers, skip_first, skip_last),
                              "updates": topology.history, "layer_sparsity": masks.layer_sparsity()},
                       mechanism=judge_mechanism(self, topology.telemetry()))


@register_method("rigl")
class RigL(_DynamicSparseTraining):
    """RigL (Evci et al. 2020): drop by |w|, grow by dense |gradient|, cosine drop fraction, ERK.

    On the benchmark's prunable set by default (input layer and classifier dense);
    `layers=official` is the official scripts' set, the classifier pruned at its ERK density
    (see `resolve_skips`). Signal control: random growth with everything else equal, which is
    SET with RigL's schedule (`set`, its defaults; `grow="random"` on RigL is the same run)."""

    signal_controls = {"random growth": {"method": "set", "grow": "random"}}


@register_method("set")
class SET(_DynamicSparseTraining):
    """SET (Mocanu et al. 2018): drop by |w|, grow at random; RigL's schedule and zero init by default."""

    @dataclass(frozen=True)
    class Config(DynamicSparseConfig):
        grow: Literal["gradient", "random"] = "random"
        # fixed ζ = alpha at each epoch end, new weights drawn at random [reconstructed from the SET paper]
        set_original: bool = False

    def schedule(self, budget: int, steps_per_epoch: int) -> tuple:
        if self.config.set_original:
            return max(1, steps_per_epoch), budget
        return super().schedule(budget, steps_per_epoch)

    def topology_hook(self, masks: MaskSet, delta: int, t_end: int, generator) -> DynamicSparsity:
        cfg = self.config
        if not cfg.set_original:
            return super().topology_hook(masks, delta, t_end, generator)
        return DynamicSparsity(masks, delta, t_end, cfg.alpha, cfg.grow, generator,
                               drop_fraction=lambda t: cfg.alpha, grow_init="random", updates=cfg.topology_updates)

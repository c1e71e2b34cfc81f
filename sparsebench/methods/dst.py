"""Gradual magnitude pruning (Zhu & Gupta 2017, "To prune, or not to prune").

Training starts dense. At t = t0, t0+Δt, ..., t0+nΔt the sparsity is raised along a cubic
schedule, s_t = s_f + (s_i − s_f)·(1 − (t − t0)/(nΔt))³, and the smallest-|w| weights are
masked (per layer, or globally). Pruned weights stay zero; the learning rate keeps
decaying after the pruning window. The harness fine-tune, masks fixed, follows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional

import torch

from sparsebench.errors import SpecError
from sparsebench.training.trainer import Trainer, TrainerHook
from sparsebench.training.masks import (
    MaskSet, global_topk_masks, keep_counts, layer_densities, layerwise_topk_masks, prunable_weights,
)
from sparsebench.methods.base import Method, MethodContext, Outcome, register_method


def cubic_sparsity(t: int, s_initial: float, s_final: float, t0: int, span: int) -> float:
    """Zhu & Gupta's schedule; constant s_initial before t0 and s_final after t0 + span."""
    if t <= t0:
        return s_initial
    progress = min(1.0, (t - t0) / span)
    return s_final + (s_initial - s_final) * (1.0 - progress) ** 3


class GradualPruning(TrainerHook):
    def __init__(self, masks: MaskSet, prune_steps: List[int], schedule, scope: str, generator):
        self.masks, self.prune_steps, self.schedule = masks, set(prune_steps), schedule
        self.scope, self.generator = scope, generator
        self.history: List[dict] = []

    def after_step(self, trainer: Trainer) -> None:
        if trainer.step not in self.prune_steps:
            return
        sparsity = self.schedule(trainer.step)
        params = self.masks.params
        scores = {n: p.detach().abs() for n, p in params.items()}
        if self.scope == "global":
            new = global_topk_masks(scores, sparsity, self.generator)
        else:
            new = layerwise_topk_masks(scores, keep_counts(params, layer_densities(params, sparsity)), self.generator)
        for n, m in new.items():
            self.masks.update(n, m, trainer.optimizer)
        self.masks.mask_optimizer_state(trainer.optimizer)
        self.history.append({"step": trainer.step, "target": sparsity, "sparsity": self.masks.sparsity()})


@register_method("gmp")
class GMP(Method):
    """Gradual magnitude pruning with the cubic schedule (Zhu & Gupta 2017)."""

    granularity = "unstructured"

    @dataclass(frozen=True)
    class Config:
        scope: Literal["layer", "global"] = "layer"
        initial_sparsity: float = 0.0
        start_fraction: float = 0.1      # t0 as a fraction of the step budget
        end_fraction: float = 0.75       # t0 + nΔt
        delta_t: Optional[int] = None    # steps between prunes; None: 100, capped to give ≥ 10 prunes
        from_pretrained: bool = False
        skip_first: bool = True        # input layer and classifier dense, as in RigL, GaP, ShrinkBench
        skip_last: bool = True

        def __post_init__(self):
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
            cfg.scope, torch.Generator().manual_seed(ctx.seed),
        )
        trainer = ctx.make_trainer(hooks=[pruning, masks])
        trainer.fit(budget, progress=ctx.progress, desc="gmp")
        return Outcome(model=ctx.model, realization="masked", masks=masks, prunable=list(params),
                       notes={"schedule": {"t0": t0, "delta_t": delta, "n": n}, "prune_history": pruning.history})

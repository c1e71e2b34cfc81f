"""Controls every leaderboard carries (protocol §7): dense, random, magnitude, L1-channel,
random-channel and a smaller dense model at matched FLOPs.

References: global / layer-wise magnitude pruning (Han et al. 2015; Blalock et al. 2020
as controls); ERK allocation (Evci et al. 2020); L1-norm filter pruning (Li et al. 2017,
"Pruning Filters for Efficient ConvNets"), compacted through torch-pruning.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Literal

import torch
from torch import nn

from sparsebench.errors import SpecError
from timm.models.vision_transformer import VisionTransformer

from sparsebench.training.channels import ChannelSpace
from sparsebench.training.vit_units import ViTUnitSpace
from sparsebench.training.importance import MagnitudeImportance, RandomImportance
from sparsebench.training.masks import (
    MaskSet, global_topk_masks, keep_counts, layer_densities, layerwise_topk_masks, prunable_weights,
)
from sparsebench.methods.base import (
    OMITTED_AT_DEFAULT, Method, MethodContext, Outcome, apply_layer_set, layer_set_note, layers_field,
    register_method,
)


@register_method("dense")
class Dense(Method):
    """Dense reference: the shared dense checkpoint, evaluated as it is."""

    granularity = "none"
    starts_from = "pretrained"

    def run(self, ctx: MethodContext) -> Outcome:
        return Outcome(model=ctx.model, realization="dense", finetune=False,
                       prunable=list(prunable_weights(ctx.model)))


@dataclass(frozen=True)
class LayerwiseConfig:
    distribution: Literal["uniform", "erk"] = "uniform"
    # Input layer and classifier stay dense by default, as in GaP and ShrinkBench (RigL keeps only the input layer):
    # they hold few weights and pruning them costs accuracy out of proportion.
    skip_first: bool = True
    skip_last: bool = True
    # "official": RigL's scripts' set, the classifier pruned too (`methods.base.LAYER_SETS`)
    layers: Literal["benchmark", "official"] = layers_field()

    def __post_init__(self):
        apply_layer_set(self)


class _UnstructuredOneShot(Method):
    """Prune a trained model once to the target sparsity; the harness fine-tunes with masks held."""

    granularity = "unstructured"
    starts_from = "pretrained"
    Config = LayerwiseConfig

    def scores(self, params, generator):
        raise NotImplementedError

    def masks(self, params, scores, sparsity, generator):
        cfg = self.config
        counts = keep_counts(params, layer_densities(params, sparsity, cfg.distribution))
        return layerwise_topk_masks(scores, counts, generator)

    def run(self, ctx: MethodContext) -> Outcome:
        cfg = self.config
        params = prunable_weights(ctx.model, exclude=ctx.dense_layers(cfg.skip_first, cfg.skip_last))
        generator = torch.Generator().manual_seed(ctx.seed)
        scores = self.scores(params, generator)
        masks = MaskSet(ctx.model, self.masks(params, scores, ctx.target.value, generator))
        return Outcome(model=ctx.model, realization="masked", masks=masks, prunable=list(params),
                       notes={"layers": layer_set_note(cfg.layers, cfg.skip_first, cfg.skip_last),
                              "layer_sparsity": masks.layer_sparsity()})


@register_method("random")
class RandomUnstructured(_UnstructuredOneShot):
    """Random unstructured pruning at the target sparsity (uniform or ERK per layer)."""

    def scores(self, params, generator):
        return {n: torch.rand(p.shape, generator=generator).to(p.device) for n, p in params.items()}


@register_method("magnitude-layerwise")
class MagnitudeLayerwise(_UnstructuredOneShot):
    """Per-layer |w| pruning, each layer at its allocated sparsity (uniform or ERK)."""

    def scores(self, params, generator):
        return {n: p.detach().abs() for n, p in params.items()}


@register_method("magnitude-global")
class MagnitudeGlobal(_UnstructuredOneShot):
    """Global |w| pruning: one threshold across all prunable layers."""

    @dataclass(frozen=True)
    class Config:
        skip_first: bool = True        # input layer dense (see LayerwiseConfig)
        skip_last: bool = True         # classifier dense
        layers: Literal["benchmark", "official"] = layers_field()

        def __post_init__(self):
            apply_layer_set(self)

    def scores(self, params, generator):
        return {n: p.detach().abs() for n, p in params.items()}

    def masks(self, params, scores, sparsity, generator):
        return global_topk_masks(scores, sparsity, generator)


def unit_space(model: nn.Module, input_size, residual_mode: str):
    """CNN output channels (dependency groups), or ViT attention heads and MLP neurons."""
    if isinstance(model, VisionTransformer):
        return ViTUnitSpace(model, input_size)
    return ChannelSpace(model, input_size, residual_mode)


@dataclass(frozen=True)
class StructuredConfig:
    residual_mode: Literal["coupled", "internal"] = "coupled"   # CNNs only (see _channels.py)
    scope: Literal["uniform", "global"] = "uniform"
    min_channels: int = 1                                       # floor of kept units per group
    # Uniform scope's greedy fill (after the one keep ratio, channels while the budget holds) ranks
    # "raw" scores across groups, so coupled residual groups, whose scores sum several convs, take
    # the extra channels; "normalized" ranks each score over its group's mean, as global scope does.
    # Global scope always ranks normalised scores. See docs/conventions.md.
    fill: Literal["raw", "normalized"] = field(default="raw", metadata=OMITTED_AT_DEFAULT)


class _ChannelOneShot(Method):
    """Score units of a trained model, keep the best under the FLOPs target, compact.

    CNNs: output channels, dependency-aware (`residual_mode`). ViTs: attention heads and
    MLP neurons per block (embedding width kept), exported to a smaller timm ViT.
    """

    granularity = "channel"
    starts_from = "pretrained"
    Config = StructuredConfig

    def unit_scores(self, model, space, generator):
        raise NotImplementedError

    def score_convention(self, space) -> str:
        """What a unit's score is, for the record (two conventions must be told apart)."""
        raise NotImplementedError

    def normalizes_scores(self) -> bool:
        """Whether ranking across groups compares each score to its group's mean."""
        return self.config.scope == "global" or self.config.fill == "normalized"

    def ranking_scores(self, scores: List[torch.Tensor]) -> List[torch.Tensor]:
        """The scores `select` compares across groups: raw, or over their group's mean."""
        if not self.normalizes_scores():
            return scores
        # layers differ in scale: a ranking across groups compares scores relative to their group's
        # mean (within a group the order is unchanged, so uniform scope's counts stay as they are)
        return [s / s.abs().mean().clamp_min(1e-12) for s in scores]

    def select_units(self, space, scores, flops_ratio: float) -> List[torch.Tensor]:
        """Kept units under `flops_ratio` from raw unit scores, as this config ranks them."""
        cfg = self.config
        return space.select(self.ranking_scores(scores), flops_ratio, scope=cfg.scope, min_units=cfg.min_channels)

    def run(self, ctx: MethodContext) -> Outcome:
        cfg = self.config
        space = unit_space(ctx.model, ctx.input_size, cfg.residual_mode)
        generator = torch.Generator().manual_seed(ctx.seed)
        scores = self.unit_scores(ctx.model, space, generator)
        kept = self.select_units(space, scores, ctx.target.value)
        compact = space.compact(ctx.model, kept)
        notes = {"scope": cfg.scope, "units": space.describe(), "scores": self.score_convention(space),
                 "fill": "normalized" if self.normalizes_scores() else "raw",
                 "compaction_max_abs_error": space.check_compaction(ctx.model, kept, compact,
                                                                    next(iter(ctx.val_loader))[0].to(ctx.device))}
        if isinstance(space, ChannelSpace):
            notes["residual_mode"] = cfg.residual_mode
        return Outcome(model=compact, realization="compacted", structure=space.structure(kept),
                       prunable=list(prunable_weights(ctx.model)), notes=notes)


@register_method("l1-channel")
class L1Channel(_ChannelOneShot):
    """L1-norm filter pruning (Li et al. 2017); CNN channels or ViT heads/neurons, compacted."""

    def unit_scores(self, model, space, generator):
        # CNN: a coupled group's channel lives in every producing conv, so its filter L1
        # norms are summed; ViT head: its q, k, v rows + proj columns; neuron: fc1 row + fc2 column
        return MagnitudeImportance(p=1)(model, space)

    def score_convention(self, space) -> str:
        return MagnitudeImportance(p=1).describe(space)


@register_method("random-channel")
class RandomChannel(_ChannelOneShot):
    """Random channel (CNN) or head/neuron (ViT) pruning under the FLOPs target, compacted."""

    def unit_scores(self, model, space, generator):
        return RandomImportance(generator)(model, space)

    def score_convention(self, space) -> str:
        return "uniform random per unit (seeded)"


@register_method("dense-small")
class DenseSmall(Method):
    """A narrower dense model at matched FLOPs, trained from scratch with the same total steps."""

    granularity = "channel"
    starts_from = "scratch"

    @dataclass(frozen=True)
    class Config:
        pass

    def run(self, ctx: MethodContext) -> Outcome:
        dense_macs = ctx.dense_macs or ctx.count_macs().macs
        budget = ctx.target.value * dense_macs
        if hasattr(ctx.model, "blocks") and hasattr(ctx.model, "embed_dim"):
            model, structure = _narrow_vit(ctx, budget)
        else:
            model, structure = _narrow_cnn(ctx)
        model = model.to(ctx.device)
        trainer = ctx.make_trainer(model)
        result = trainer.fit(ctx.budget.left, progress=ctx.progress, desc="dense-small")
        return Outcome(model=model, realization="compacted", structure=structure,
                       prunable=list(prunable_weights(ctx.model)),
                       notes={"train_steps": result.steps})


def _narrow_cnn(ctx: MethodContext):
    """Uniformly narrow every channel group (residual streams included), then re-initialise."""
    fresh = ctx.make_model()
    space = ChannelSpace(fresh, ctx.input_size, "coupled")
    # Equal scores: which channels go is irrelevant, the narrow model is re-initialised.
    scores = [torch.linspace(1.0, 0.0, g.size) for g in space.groups]
    kept = space.select(scores, ctx.target.value, scope="uniform")
    model = space.compact(fresh, kept)
    torch.manual_seed(ctx.seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    return model, space.structure(kept)


def _narrow_vit(ctx: MethodContext, budget: float):
    """Narrower embedding (heads kept, head dim reduced) with MLP width filling the budget."""
    from sparsebench.measure.flops import count_macs

    ref = ctx.model
    heads = ref.blocks[0].attn.num_heads
    head_dim = ref.embed_dim // heads
    mlp_ratio = ref.blocks[0].mlp.fc1.out_features / ref.embed_dim
    best = None
    for hd in range(head_dim, 0, -1):
        # the widest embedding that fits at the original MLP ratio, then MLP width fills the rest
        dim = hd * heads
        if count_macs(ctx.make_model(embed_dim=dim, mlp_ratio=mlp_ratio), ctx.input_size).macs > budget:
            continue
        lo, hi = mlp_ratio, mlp_ratio * (hd + 1) ** 2 / hd ** 2
        for _ in range(20):
            mid = (lo + hi) / 2
            macs = count_macs(ctx.make_model(embed_dim=dim, mlp_ratio=mid), ctx.input_size).macs
            lo, hi = (mid, hi) if macs <= budget else (lo, mid)
        best = (dim, lo)
        break
    if best is None:
        raise SpecError(f"flops={ctx.target.value:g} is below the smallest ViT reachable by narrowing")
    torch.manual_seed(ctx.seed)
    dim, ratio = best
    model = ctx.make_model(embed_dim=dim, mlp_ratio=ratio)
    return model, {"embed_dim": dim, "mlp_hidden": model.blocks[0].mlp.fc1.out_features, "num_heads": heads}

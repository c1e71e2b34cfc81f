"""The method adapter interface: what a method is given, and what it hands back.

A method *decides* (which weights, channels, heads or tokens to keep); shared machinery
(`training.masks`, `training.channels`, the trainer, the exporters) *does* (applies masks, keeps them
applied, compacts models). The harness owns data, dense checkpoint, fine-tuning,
evaluation and measurement, identically for every method.

    @register_method("my-method")
    class MyMethod(Method):
        granularity = "unstructured"       # unstructured | n:m | channel | head | token | none
        starts_from = "pretrained"         # pretrained | scratch

        @dataclass(frozen=True)
        class Config:
            alpha: float = 0.3

        def run(self, ctx: MethodContext) -> Outcome: ...

Targets are met within a tolerance the record states (`target_met`): sparsity within
`sparsity_tolerance` either side; an achieved FLOPs ratio within
[target - below, target + above] of `flops_tolerance = (below, above)`. A method whose
search cannot land closer (e.g. coarse units such as whole heads) declares its own.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from sparsebench.datasets.base import DatasetInfo
from sparsebench.errors import Diverged
from sparsebench.models import ModelCard, model_card
from sparsebench.specs import Recipe, SpecError, Target
from sparsebench.training.trainer import StepBudget, Trainer, TrainerHook
from sparsebench.registry import Registry

METHODS = Registry("method", entry_point_group="sparsebench.methods")

GRANULARITIES = ("none", "unstructured", "n:m", "channel", "head", "token")
STRUCTURED = ("channel", "head", "token")
TARGET_KIND = {"none": "none", "unstructured": "sparsity", "n:m": "sparsity",
               "channel": "flops", "head": "flops", "token": "flops"}


@dataclass
class Outcome:
    """What a method hands back to the harness.

    model        the sparse model: masked in place, or already compacted (smaller dense)
    masks        unstructured masks the fine-tune must keep applied (a `training.masks.MaskSet`)
    realization  "dense" (nothing removed), "compacted" (a physically smaller model),
                 "masked" (zeros inside dense tensors: not realizable on stock kernels)
    structure    kept channels / heads / widths, JSON-serialisable, stored in the record
    prunable     parameter names the sparsity target is stated over (dense-model names)
    notes        method-specific facts for the record (forced groups, faithfulness, ...)
    finetune     False only for the dense reference, which is not trained further
    """

    model: nn.Module
    realization: str
    masks: Optional[Any] = None
    structure: Optional[dict] = None
    prunable: Optional[List[str]] = None
    notes: Dict[str, Any] = field(default_factory=dict)
    finetune: bool = True

    def __post_init__(self):
        if self.realization not in ("dense", "compacted", "masked"):
            raise ValueError(f"realization must be dense, compacted or masked, got {self.realization!r}")


class LossGuard(TrainerHook):
    """Stops training at the first non-finite loss, before the optimizer step spreads it into
    the weights; the harness records the run as diverged. (One host sync per step: the
    price of never saving a NaN model as a result.)"""

    def __init__(self, stage: str):
        self.stage = stage

    def after_backward(self, trainer: Trainer) -> None:
        if trainer.loss is not None and not bool(torch.isfinite(trainer.loss.detach())):
            raise Diverged(self.stage, f"non-finite training loss ({float(trainer.loss.detach()):.3g}) at step {trainer.step}")


@dataclass
class MethodContext:
    """Everything the harness hands a method."""

    model: nn.Module                  # the dense checkpoint (pretrained) or a fresh init (scratch)
    model_name: str
    make_model: Callable[..., nn.Module]   # fresh model of the same family: make_model(**overrides)
    train_loader: DataLoader
    val_loader: DataLoader
    num_classes: int
    input_size: tuple                 # (C, H, W)
    target: Target
    budget: StepBudget                # optimizer steps this method may spend
    recipe: Recipe
    device: torch.device
    seed: int
    config: Any                       # the method's Config instance
    progress: Optional[Callable[..., Any]] = None
    dense_macs: Optional[int] = None  # MACs of the dense model at input_size
    card: Optional[ModelCard] = None  # the registered model's card; looked up from model_name when not given
    data_info: Optional[DatasetInfo] = None   # classes, resolution, normalisation, source of the data

    def __post_init__(self):
        if self.card is None:
            self.card = model_card(self.model_name)

    def dense_layers(self, skip_first: bool, skip_last: bool) -> List[str]:
        """Module names an unstructured method leaves dense: the card's input layer and/or classifier."""
        return [name for name, skip in zip(self.card.edge_layers, (skip_first, skip_last)) if skip]

    def make_trainer(
        self,
        model: Optional[nn.Module] = None,
        hooks: Sequence[TrainerHook] = (),
        param_groups: Sequence[dict] = (),
        lr: Optional[float] = None,
        train_model_params: bool = True,
        recipe: Optional[Recipe] = None,
        model_mode: str = "train",
        no_weight_decay: Sequence[nn.Parameter] = (),
    ) -> Trainer:
        """A trainer on the shared recipe whose steps count against this method's budget.

        See `Trainer` for `train_model_params`, `model_mode` and `no_weight_decay`; extra
        trainable modules join through `param_groups` (dicts as torch optimizers take them).
        """
        recipe = recipe or self.recipe
        # The guard runs first, so no hook of the method acts on a non-finite step.
        return Trainer(
            model if model is not None else self.model, self.train_loader, recipe, self.device,
            self.num_classes, lr if lr is not None else recipe.lr, hooks=[LossGuard("method"), *hooks],
            param_groups=param_groups, budget=self.budget, train_model_params=train_model_params,
            model_mode=model_mode, no_weight_decay=no_weight_decay,
        )

    def count_macs(self, model: Optional[nn.Module] = None):
        from sparsebench.measure.flops import count_macs

        return count_macs(model if model is not None else self.model, self.input_size)


class Method:
    name: str = ""
    granularity: str = "unstructured"
    starts_from: str = "pretrained"
    description: str = ""
    sparsity_tolerance: float = 0.005                  # |achieved - target| allowed for a sparsity target
    flops_tolerance: Tuple[float, float] = (0.03, 0.01)   # (below, above) the target FLOPs ratio

    @dataclass(frozen=True)
    class Config:
        pass

    def __init__(self, config: Optional[Any] = None):
        self.config = config if config is not None else self.Config()

    @property
    def target_kind(self) -> str:
        return TARGET_KIND[self.granularity]

    def supports(self, model: nn.Module, family: str) -> bool:
        """Whether the method can run on this model (family is 'cnn' or 'vit')."""
        return True

    def run(self, ctx: MethodContext) -> Outcome:
        raise NotImplementedError


def register_method(name: str):
    """Class decorator: register a `Method` subclass under `name`."""

    def decorator(cls):
        if cls.granularity not in GRANULARITIES:
            raise ValueError(f"{cls.__name__}.granularity={cls.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        if isinstance(cls.starts_from, str) and cls.starts_from not in ("pretrained", "scratch"):
            raise ValueError(f"{cls.__name__}.starts_from={cls.starts_from!r}; allowed: pretrained, scratch")
        cls.name = name
        description = cls.description or ((cls.__doc__ or "").strip().splitlines() or [name])[0]
        METHODS.register(name, description)(cls)
        return cls

    return decorator


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Turn a CLI / YAML value into the Config field's type, or raise a one-line SpecError."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:                         # Optional[X]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        annotation = args[0]
        origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise SpecError(f"bad value {value!r} for {where}; allowed: {', '.join(map(str, allowed))}")
        return value
    if origin in (tuple, typing.Tuple):
        items = value.split(",") if isinstance(value, str) else list(value)
        inner = (typing.get_args(annotation) or (str,))[0]
        return tuple(_coerce(v, inner, where) for v in items)
    try:
        if annotation is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if annotation in (int, float, str):
            return annotation(value)
    except (TypeError, ValueError):
        raise SpecError(f"bad value {value!r} for {where}; expected {annotation.__name__}") from None
    return value


def build_config(method_cls, args: Dict[str, Any]):
    """Method Config from user args (CLI strings or YAML values), with clear errors."""
    cfg_cls = method_cls.Config
    hints = typing.get_type_hints(cfg_cls)
    fields = {f.name for f in dataclasses.fields(cfg_cls)}
    values = {}
    for key, value in args.items():
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "(none)"
            raise SpecError(f"unknown argument {key!r} for method {method_cls.name!r}; allowed: {allowed}")
        values[key] = _coerce(value, hints[key], f"{method_cls.name}.{key}")
    try:
        return cfg_cls(**values)
    except (ValueError, TypeError) as e:
        raise SpecError(f"method {method_cls.name!r}: {e}") from None


def create_method(name: str, **args) -> Method:
    cls = METHODS.get(name).factory
    return cls(build_config(cls, args))


def config_dict(config: Any) -> Dict[str, Any]:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}

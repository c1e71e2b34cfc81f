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

Every method that has a defining mechanism (a search, a regrowth, a topology update) shows
in its record that it acted: `run` returns `Outcome.mechanism`, built by `judge_mechanism`
from the telemetry the method measured and the thresholds it declares
(`mechanism_thresholds`). Its `null_control` names the Config values that switch that
mechanism off with everything else equal; a suite with `controls: true` runs that control
beside it. Baselines declare neither, and their records say "no mechanism".

"Acted" shows that something changed, not that the method's signal mattered: random change can
meet every threshold. So a seed method also declares its `signal_controls`, {name: Config
values}: the mechanism runs, its informative signal replaced by noise, all else equal (C-GaP's
prune-back by random scores, PASS's search on shuffled labels, ...). A value under the key
"method" names another registered method that is that control (RigL's random growth is SET).
A run of a signal control records `mechanism.signal_control` (its name), and the leaderboard's
`Δ signal` pairs the method with it.

A method whose mechanism needs a longer budget than the family's default recipe gives (OFB's
search, PASS's search) declares it in `default_budget`, so a plain `sparsebench run` acts.

Targets are met within a tolerance the record states (`target_met`): sparsity within
`sparsity_tolerance` either side; an achieved FLOPs ratio within
[target - below, target + above] of `flops_tolerance = (below, above)`. A method whose
search cannot land closer (e.g. coarse units such as whole heads) declares its own.
"""
from __future__ import annotations

import dataclasses
import logging
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.utils.data import DataLoader

from sparsebench.datasets.base import DatasetInfo
from sparsebench.errors import Diverged
from sparsebench.models import ModelCard, model_card

from sparsebench.specs import Recipe, SpecError, Target, coerce_scalar
from sparsebench.store.record import Mechanism, meets_threshold, threshold_bound
from sparsebench.training.resume import RunCheckpoints
from sparsebench.training.telemetry import TrainingCurve
from sparsebench.training.trainer import ComputeMeter, StepBudget, Trainer, TrainerHook
from sparsebench.registry import Registry

METHODS = Registry("method", entry_point_group="sparsebench.methods")
log = logging.getLogger("sparsebench")

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
                 "masked" (zeros inside dense tensors: timed through `auto`, per layer dense or CSR kernels)
    structure    kept channels / heads / widths, JSON-serialisable, stored in the record
    prunable     parameter names the sparsity target is stated over (dense-model names)
    notes        method-specific facts for the record (forced groups, faithfulness, ...)
    finetune     False only for the dense reference, which is not trained further
    mechanism    whether the method's defining mechanism acted (`judge_mechanism`); None
                 for a method without one (a baseline)
    pattern      the N:M pattern the method builds its masks to ("2:4"), stored in the record as
                 `sparsity_pattern`; only a declared "2:4" is timed with 2:4 kernels
                 (`measure.realize`). None: unstructured, however the zeros happen to fall
    """

    model: nn.Module
    realization: str
    masks: Optional[Any] = None
    structure: Optional[dict] = None
    prunable: Optional[List[str]] = None
    notes: Dict[str, Any] = field(default_factory=dict)
    finetune: bool = True
    mechanism: Optional[Mechanism] = None
    pattern: Optional[str] = None

    def __post_init__(self):
        if self.realization not in ("dense", "compacted", "masked"):
            raise ValueError(f"realization must be dense, compacted or masked, got {self.realization!r}")
        if self.pattern is not None:
            n, _, m = self.pattern.partition(":")
            if not (n.isdigit() and m.isdigit() and 0 < int(n) < int(m)):
                raise ValueError(f"pattern must be 'N:M' with 0 < N < M (e.g. '2:4'), got {self.pattern!r}")
            if self.realization != "masked":
                raise ValueError(f"an N:M pattern describes masks; realization is {self.realization!r}")


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
    checkpoints: Optional[RunCheckpoints] = None   # the run's resume point; every make_trainer fit uses it
    # settings the method could not use as given on this run's budget (`adjusted`): the record's
    # `notes["adjusted"]`, each also logged as a warning when it happens
    adjustments: List[Dict[str, Any]] = field(default_factory=list)
    compute: ComputeMeter = field(default_factory=ComputeMeter)   # training MACs of the method
    curve: TrainingCurve = field(default_factory=TrainingCurve)  # loss, lr, val, events of the method's fits
    trainers: List[Trainer] = field(default_factory=list)        # every trainer make_trainer built

    def adjusted(self, setting: str, given: Any, used: Any, why: str) -> None:
        """A user setting used otherwise than given, because this run's budget leaves no other way
        (a value only the budget makes too large): recorded with the value used, and said at once as
        one warning line, e.g. "update_every 100000 > T_end 455: one update, at step 454"."""
        text = f"{setting} {given} {why}"
        self.adjustments.append({"setting": setting, "given": given, "used": used, "why": text})
        log.warning("sparsebench: warning: %s", text)

    def finish_trainers(self) -> None:
        """Read every trainer's unread losses (`Diverged` if one is not finite; a method that calls
        `train_step` itself leaves the last few unread) and give the models back in the default layout."""
        for trainer in self.trainers:
            trainer.finish()

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

        Its fits checkpoint and resume with the run, and its MACs count as the method's
        (`compute`); a hook adds work the model does not show through `trainer.add_macs`. See `Trainer` for `train_model_params`, `model_mode` and `no_weight_decay`; extra
        trainable modules join through `param_groups` (dicts as torch optimizers take them).
        """
        recipe = recipe or self.recipe
        trainer = Trainer(
            model if model is not None else self.model, self.train_loader, recipe, self.device,
            self.num_classes, lr if lr is not None else recipe.lr, hooks=hooks, param_groups=param_groups,
            budget=self.budget, train_model_params=train_model_params, model_mode=model_mode,
            no_weight_decay=no_weight_decay, checkpoints=self.checkpoints, compute=self.compute, stage="method",
            curve=self.curve,
        )
        self.trainers.append(trainer)
        return trainer

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
    # Config values that switch the defining mechanism off (the null control); None: a baseline
    null_control: Optional[Dict[str, Any]] = None
    # {name: Config values} that replace the mechanism's informative signal by noise, all else equal
    # (the signal controls); a "method" key names another registered method that is the control
    signal_controls: Dict[str, Dict[str, Any]] = {}
    # {telemetry metric: minimum} or {metric: (">=" | "<=", bound)}: the mechanism acted when all hold
    mechanism_thresholds: Dict[str, Any] = {}
    # Recipe values (budgets such as `search_epochs`) at which the mechanism acts on the default
    # recipe: laid over the model family's recipe by `sparsebench run` and by every suite; a value the
    # suite (suite-wide, per family or per entry) or `--recipe` states wins. The run's spec states the
    # budget it got, like every recipe value.
    default_budget: Dict[str, Any] = {}

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

    @property
    def budget_scale(self) -> float:
        """The multiple of the protocol's method budget this run trains for: 1 (equal steps)
        unless a method offers extended training (RigL's 2×, 5× rows); the record's
        `method_budget_steps` and training MACs carry the difference."""
        return 1.0

    def method_budget(self, pretrain_steps: int, search_steps: int) -> int:
        """The optimizer steps this method may spend under the protocol: the dense-pretrain budget
        from scratch, the search budget from a trained model, × `budget_scale`."""
        return int(round((pretrain_steps if self.starts_from == "scratch" else search_steps) * self.budget_scale))

    @property
    def is_control(self) -> bool:
        """True when this instance is the method's null control (its mechanism switched off)."""
        return bool(self.null_control) and all(getattr(self.config, k) == v for k, v in self.null_control.items())

    @classmethod
    def signal_controls_for(cls, args: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
        """The signal controls a run with `args` is paired with: `signal_controls` unless a method
        matches them to its setting (S²ViTE: none for the paper's growth criterion)."""
        return cls.signal_controls

    @property
    def signal_control(self) -> Optional[str]:
        """The name of the signal control this instance is (its Config holds that control's values),
        or None. A control that names another method (RigL's: SET) is that method's run; this
        method with the same values (`rigl[grow=random]`) is the same run, and a signal control too."""
        for name, values in self.signal_controls.items():
            if all(getattr(self.config, k) == v for k, v in values.items() if k != "method"):
                return name
        return None

    def run(self, ctx: MethodContext) -> Outcome:
        raise NotImplementedError


def signal_control_runs(method_name: str, args: Mapping[str, Any]) -> List[Tuple[str, str, Dict[str, Any]]]:
    """[(control name, method, args)] of the signal controls of a run of `method_name` with `args`:
    its args with the control's values laid over them, under the method the control names (if any);
    [] for a method that declares none, or one no longer installed."""
    try:
        declared = METHODS.get(method_name).factory.signal_controls_for(args)
    except Exception:          # noqa: BLE001 -- a method no longer installed has no declared controls
        return []
    out = []
    for name, values in declared.items():
        values = dict(values)
        method = values.pop("method", method_name)
        out.append((name, method, {**dict(args), **values}))
    return out


def judge_mechanism(method: Method, metrics: Dict[str, Any], note: str = "") -> Mechanism:
    """The record's `mechanism` from the telemetry a method measured, judged against its
    `mechanism_thresholds`: it acted when every metric reaches its bound. A null control is
    marked as such, whatever its numbers say. A signal control is judged by the same thresholds
    (that random change can meet them is what it shows) and marked `signal_control`. `note` adds a
    method's own remark."""
    thresholds = {k: threshold_bound(v) for k, v in method.mechanism_thresholds.items()}
    failed = [f"{key} = {_short(metrics.get(key))} (needs {op} {bound:g})"
              for key, (op, bound) in thresholds.items() if not meets_threshold(metrics.get(key), (op, bound))]
    if method.is_control:
        acted = not failed
        args = ", ".join(f"{k}={v}" for k, v in method.null_control.items())
        reason = f"null control ({args}): the mechanism is switched off"
        if acted:                      # a control whose numbers pass: the switch did not switch it off
            reason = (f"null control ({args}), but its telemetry passes every threshold: the mechanism "
                      "was not switched off")
    elif failed:
        acted, reason = False, "did not act: " + "; ".join(failed)
    else:
        acted = True
        reason = "acted: " + ", ".join(f"{k} = {_short(metrics[k])} ({op} {bound:g})"
                                       for k, (op, bound) in thresholds.items())
    signal = None if method.is_control else method.signal_control
    if signal is not None:
        args = ", ".join(f"{k}={v}" for k, v in method.signal_controls[signal].items())
        reason = f"signal control '{signal}' ({args}): the signal replaced by noise; " + reason
    if note:
        reason += f"; {note}"
    return Mechanism(declared=True, acted=acted, reason=reason, control=method.is_control,
                     metrics=metrics, thresholds={k: list(v) for k, v in thresholds.items()},
                     signal_control=signal)


NO_MECHANISM = Mechanism(declared=False, acted=None, reason="baseline: no mechanism beyond its criterion")


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def register_method(name: str):
    """Class decorator: register a `Method` subclass under `name`."""

    def decorator(cls):
        if cls.granularity not in GRANULARITIES:
            raise ValueError(f"{cls.__name__}.granularity={cls.granularity!r}; allowed: {', '.join(GRANULARITIES)}")
        if isinstance(cls.starts_from, str) and cls.starts_from not in ("pretrained", "scratch"):
            raise ValueError(f"{cls.__name__}.starts_from={cls.starts_from!r}; allowed: pretrained, scratch")
        unknown = sorted(set(cls.default_budget) - {f.name for f in dataclasses.fields(Recipe)})
        if unknown:
            raise ValueError(f"{cls.__name__}.default_budget names {unknown[0]!r}, which is not a recipe value")
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
    # method knobs have always been stored as the annotated type (float(3) == 3.0), so keep_int=False
    return coerce_scalar(value, annotation, where, keep_int=False)


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


# Metadata of a Config field added after runs were recorded: the spec leaves it out while it holds
# its default, so the hashes (and record names) of every run that does not set it stay as they were.
OMITTED_AT_DEFAULT = {"omitted_at_default": True}


def config_dict(config: Any) -> Dict[str, Any]:
    """The Config as a spec's `method_args` stores it (`OMITTED_AT_DEFAULT` fields only when set)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
            if not (f.metadata.get("omitted_at_default") and getattr(config, f.name) == f.default)}


# Which conv/linear weights an unstructured method prunes, as a named preset (`layers=`):
# "benchmark": `skip_first` / `skip_last` as set (by default input layer and classifier dense, the
#   set every unstructured target of the benchmark is stated over);
# "official": RigL's scripts (`first_layer_sparsity=0`, `last_layer_sparsity=-1`; CIFAR
#   `prune_first_layer=False`): the input layer dense, the classifier pruned with the rest.
LAYER_SETS = ("benchmark", "official")
OFFICIAL_SKIPS = (True, False)


# The sanity checks of a method that prunes from a pretrained model (`training.sanity`), as its
# `sanity` setting: "none" (the method), "shuffle" (its masks permuted within each layer before the
# fine-tune), "reinit" (its structure re-initialised and trained from scratch by the harness for the
# dense pretrain + fine-tune steps). A method offering them adds `sanity: ... = sanity_field()` and
# `**SANITY_CONTROLS` to its signal controls; "reinit" is done by the pipeline, "shuffle" by the method
# where its masks are decided (it calls `training.sanity.shuffle_within_layers`).
SANITY_CONTROLS = {"layer-shuffled masks": {"sanity": "shuffle"}, "re-initialised structure": {"sanity": "reinit"}}


def sanity_field():
    return field(default="none", metadata=OMITTED_AT_DEFAULT)


def sanity_of(method: "Method") -> str:
    """The sanity check a method instance runs ("none" for a method without the setting)."""
    return getattr(method.config, "sanity", "none")


def layers_field():
    return field(default="benchmark", metadata=OMITTED_AT_DEFAULT)


def apply_layer_set(config: Any) -> None:
    """Set `skip_first` / `skip_last` of a (frozen) Config from its `layers` preset; called from
    `__post_init__`. An explicit value that contradicts the preset is an error where it can be
    told from the field's default (`skip_last=True` of a config whose default is True cannot)."""
    if config.layers not in LAYER_SETS:
        raise ValueError(f"unknown layers={config.layers!r}; allowed: {', '.join(LAYER_SETS)}")
    if config.layers != "official":
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for name, wanted in zip(("skip_first", "skip_last"), OFFICIAL_SKIPS):
        value = getattr(config, name)
        if value not in (wanted, defaults[name]):
            raise ValueError(f"layers='official' is RigL's set (skip_first={OFFICIAL_SKIPS[0]}, "
                             f"skip_last={OFFICIAL_SKIPS[1]}); got {name}={value}")
        object.__setattr__(config, name, wanted)


def layer_set_note(preset: str, skip_first: bool, skip_last: bool) -> Dict[str, Any]:
    """A run's layer set for its record's notes: the preset and the skips it resolved to."""
    return {"preset": preset, "skip_first": skip_first, "skip_last": skip_last}


def method_label(name: str, args: Mapping[str, Any]) -> str:
    """`name[k=v,...]` with the arguments that differ from the method's defaults, sorted by name
    (e.g. `random[distribution=erk]`): how leaderboards, the dry run and records name a setting.
    Tuples compare as lists (a record read back from JSON, a YAML value); a method no longer
    installed shows every argument."""
    try:
        defaults = config_dict(build_config(METHODS.get(name).factory, {}))
    except Exception:          # noqa: BLE001 -- an unknown method or default: show every argument
        defaults = {}
    plain = lambda v: list(v) if isinstance(v, tuple) else v    # noqa: E731
    changed = [(k, v) for k, v in sorted(dict(args).items()) if k not in defaults or plain(defaults[k]) != plain(v)]
    return name if not changed else f"{name}[{','.join(f'{k}={v}' for k, v in changed)}]"

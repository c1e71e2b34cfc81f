"""Suites: YAML files that expand to runs (methods × models × datasets × targets × seeds).

    name: quick
    methods: [dense, random, {name: magnitude-layerwise, args: {distribution: erk}}]
    models: [resnet20_tiny, vit_cifar_tiny]
    datasets: [digits]
    targets: {sparsity: [0.5, 0.9], flops: [0.5, 0.25]}   # each method takes its own kind
    seeds: [0, 1, 2]
    recipe: {pretrain_epochs: 10}                          # all families
    recipes: {vit: {pretrain_epochs: 30}}                  # per family, applied after `recipe`
    data: {img_size: 16, val_fraction: 0.1}
    measure: {threads: 1, batch_sizes: [1, 64]}
    pretrained: {resnet18: /path/to/weights.pth}          # optional, per model
    controls: true                                         # optional: each seed method's null control too

A method that does not support a model (e.g. channel pruning on a ViT) is skipped and
listed; every other problem is a one-line error naming the bad value.

`controls: true` adds, for every entry of a method that declares a `null_control` (the
Config values that switch its defining mechanism off), the same entry with those values:
same models, targets, seeds and recipe, so the leaderboard can pair each run with its control.
Signal controls (`Method.signal_controls`) are listed as entries of their own, and get no null
control of their own.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from sparsebench.models import FAMILY_RECIPES
from sparsebench.specs import DataSpec, MeasureSpec, Recipe, RunSpec, SpecError, Target

SUITE_KEYS = {"name", "description", "methods", "models", "datasets", "targets", "seeds", "recipe", "recipes",
              "data", "measure", "pretrained", "expected_cost", "controls"}

# Official train-split sizes, used by --dry-run estimates when the data is not on disk.
TRAIN_SIZES = {"digits": 1347, "cifar10": 50000, "cifar100": 50000, "tiny-imagenet": 100000,
               "food101": 75750, "flowers102": 2040, "pets": 3680, "imagenet": 1281167}
NATIVE_SIZES = {"digits": 16, "cifar10": 32, "cifar100": 32, "tiny-imagenet": 64, "food101": 224,
                "flowers102": 224, "pets": 224, "imagenet": 224}


@dataclass
class Suite:
    name: str
    specs: List[RunSpec]
    skipped: List[Tuple[str, str, str]] = field(default_factory=list)   # (method, model, reason)
    path: Optional[Path] = None


def _dataclass_from(cls, values: Dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise SpecError(f"{where}: expected a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(names))}")
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    try:
        return cls(**values)
    except TypeError as e:
        raise SpecError(f"{where}: {e}") from None


def recipe_for(family: str, overrides: Dict[str, Any], family_overrides: Dict[str, Dict[str, Any]],
               method_budget: Optional[Dict[str, Any]] = None) -> Recipe:
    """The family's default recipe (its model cards'), then the method's `default_budget`, then
    suite-wide values, then per-family values."""
    base = dataclasses.asdict(FAMILY_RECIPES[family])
    base.update(method_budget or {})
    base.update(overrides or {})
    base.update((family_overrides or {}).get(family, {}))
    return _dataclass_from(Recipe, base, "recipe")


ENTRY_KEYS = ("name", "args", "models", "targets", "recipe")


@dataclass(frozen=True)
class MethodEntry:
    """One item of a suite's `methods`: models/targets None take the suite's; `recipe`
    overrides the suite's recipe for this method alone (e.g. a longer search budget)."""

    name: str
    args: Dict[str, Any]
    models: Optional[list] = None
    targets: Optional[dict] = None
    recipe: Optional[Dict[str, Any]] = None


def _method_entries(raw) -> List[MethodEntry]:
    """The suite's method entries.

    An entry may narrow the suite for one method, e.g. a costly method on one model or at
    one target: `{name: gap-parallel, models: [resnet20_tiny], targets: {sparsity: [0.9]}}`,
    or give it its own recipe values: `{name: pass, recipe: {search_epochs: 10}}` (the
    record's spec states them, so the budget a method got is never hidden). A method's own
    `default_budget` applies where neither the suite nor the entry states that value.
    """
    if not isinstance(raw, list) or not raw:
        raise SpecError("suite key 'methods' must be a non-empty list")
    out = []
    for item in raw:
        if isinstance(item, str):
            out.append(MethodEntry(item, {}))
        elif isinstance(item, dict) and "name" in item:
            extra = set(item) - set(ENTRY_KEYS)
            if extra:
                raise SpecError(f"method entry {item!r}: unknown key {sorted(extra)[0]!r}; allowed: {', '.join(ENTRY_KEYS)}")
            models = item.get("models")
            if models is not None and (not isinstance(models, list) or not models):
                raise SpecError(f"method entry {item['name']!r}: 'models' must be a non-empty list, got {models!r}")
            targets = _targets(item["targets"], f"method entry {item['name']!r}: targets") if "targets" in item else None
            recipe = item.get("recipe")
            if recipe is not None:
                _dataclass_from(Recipe, {**dataclasses.asdict(Recipe()), **recipe}, f"method entry {item['name']!r}: recipe")
            out.append(MethodEntry(item["name"], dict(item.get("args") or {}), models, targets, recipe))
        else:
            raise SpecError(f"bad method entry {item!r}; expected a name or {{name: ..., args: {{...}}}}")
    return out


def _targets(raw, where: str) -> Dict[str, List[Target]]:
    if not isinstance(raw, dict):
        raise SpecError(f"{where} must map sparsity/flops to lists, got {raw!r}")
    targets = {}
    for kind, values in raw.items():
        if not isinstance(values, list):
            raise SpecError(f"{where}.{kind} must be a list, got {values!r}")
        targets[kind] = [Target(kind, v) for v in values]
    return targets


def _list(raw: Dict[str, Any], key: str) -> list:
    value = raw.get(key)
    if not isinstance(value, list) or not value:
        raise SpecError(f"suite key {key!r} must be a non-empty list, got {value!r}")
    return value


def load_suite(path: Path) -> Suite:
    path = Path(path)
    if not path.is_file():
        raise SpecError(f"suite file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise SpecError(f"suite file {str(path)!r} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"suite file {str(path)!r} must be a mapping of suite keys")
    unknown = sorted(set(raw) - SUITE_KEYS)
    if unknown:
        raise SpecError(f"suite file {str(path)!r}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(SUITE_KEYS))}")
    suite = expand(raw)
    suite.path = path
    return suite


def expand(raw: Dict[str, Any]) -> Suite:
    from sparsebench.runners.pipeline import validate
    from sparsebench.methods import METHODS
    from sparsebench.models import create_model, model_family

    methods = _method_entries(raw.get("methods"))
    controls = raw.get("controls", False)
    if not isinstance(controls, bool):
        raise SpecError(f"suite key 'controls' must be true or false, got {controls!r}")
    if controls:
        methods = with_null_controls(methods)
    models, datasets = _list(raw, "models"), _list(raw, "datasets")
    seeds = raw.get("seeds", [0])
    if not isinstance(seeds, list) or not all(isinstance(s, int) for s in seeds):
        raise SpecError(f"suite key 'seeds' must be a list of integers, got {seeds!r}")
    suite_targets = _targets(raw.get("targets") or {}, "suite key 'targets'")
    entry_models = {m for entry in methods for m in (entry.models or [])}
    stray = sorted(entry_models - set(models))
    if stray:
        raise SpecError(f"a method entry names model {stray[0]!r}, which is not in the suite's models; "
                        f"allowed: {', '.join(models)}")
    data = _dataclass_from(DataSpec, raw.get("data") or {}, "data")
    measure = _dataclass_from(MeasureSpec, raw.get("measure") or {}, "measure")
    pretrained = raw.get("pretrained") or {}

    specs, skipped = [], []
    for model in models:
        family = model_family(model)
        probe = create_model(model, num_classes=10, img_size=data.img_size or 32)
        for entry in methods:
            name, args = entry.name, entry.args
            if entry.models is not None and model not in entry.models:
                continue
            targets = entry.targets if entry.targets is not None else suite_targets
            recipe = recipe_for(family, raw.get("recipe") or {}, raw.get("recipes") or {},
                                METHODS.get(name).factory.default_budget)
            run_recipe = (recipe if entry.recipe is None else
                          _dataclass_from(Recipe, {**dataclasses.asdict(recipe), **entry.recipe}, f"method entry {name!r}: recipe"))
            method = validate(RunSpec(method=name, model=model, dataset=datasets[0],
                                      method_args=tuple(sorted(args.items())),
                                      target=_any_target(METHODS.get(name).factory, args)))
            if not method.supports(probe, family):
                skipped.append((name, model, f"{name} does not support {family} models"))
                continue
            kind = method.target_kind
            if kind != "none" and kind not in targets:
                raise SpecError(f"method {name!r} needs targets.{kind} in the suite; got targets for "
                                f"{', '.join(targets) or 'nothing'}")
            for dataset in datasets:
                for seed in seeds:
                    base = RunSpec(method=name, model=model, dataset=dataset, seed=seed,
                                   method_args=tuple(sorted(args.items())), recipe=run_recipe, data=data,
                                   measure=measure, pretrained=pretrained.get(model))
                    for target in ([Target()] if kind == "none" else targets[kind]):
                        specs.append(dataclasses.replace(base, target=target))
    return Suite(name=str(raw.get("name", "suite")), specs=specs, skipped=skipped)


def with_null_controls(methods):
    """The method entries, each followed by its null control where its method declares one
    (and the suite does not already list that control). A signal-control entry gets none: it is
    itself a control of the method's real entry, which has its own."""
    from sparsebench.methods import METHODS, build_config

    out = []
    for entry in methods:
        out.append(entry)
        cls = METHODS.get(entry.name).factory
        off = cls.null_control
        if not off or all(entry.args.get(k) == v for k, v in off.items()):
            continue
        if cls(build_config(cls, dict(entry.args))).signal_control is not None:
            continue
        control = dataclasses.replace(entry, args={**entry.args, **off})
        if control not in methods and control not in out:
            out.append(control)
    return out


def _any_target(method_cls, args) -> Target:
    """A placeholder target of the kind the method takes, for validating its args."""
    from sparsebench.methods import build_config

    kind = method_cls(build_config(method_cls, args)).target_kind
    return Target() if kind == "none" else Target(kind, 0.5)


def estimate_cost(spec: RunSpec, assume_tflops: float) -> dict:
    """Optimizer steps and training compute of one run (dense pretrain counted where shared)."""
    n_train = int(TRAIN_SIZES.get(spec.dataset, 50000) * (1 - spec.data.val_fraction))
    img = spec.data.img_size or NATIVE_SIZES.get(spec.dataset, 224)
    r = spec.recipe
    steps = {"pretrain": r.steps(r.pretrain_epochs, n_train), "finetune": r.steps(r.finetune_epochs, n_train),
             "search": r.steps(r.search_epochs, n_train)}
    macs = model_macs(spec.model, img)
    # training ≈ 3 × forward (forward + backward), 2 FLOPs per MAC
    per_step = 3 * 2 * macs * r.batch_size
    return {"steps": steps, "train_flops_per_step": per_step, "macs": macs,
            "seconds_per_step": per_step / (assume_tflops * 1e12)}


@functools.lru_cache(maxsize=None)
def model_macs(model: str, img_size: int) -> int:
    """Forward MACs per image of a model at `img_size`, counted once per (model, size): every recipe
    and method entry of a suite prices its steps with the same count."""
    from sparsebench.measure.flops import count_macs
    from sparsebench.models import create_model

    return count_macs(create_model(model, num_classes=10, img_size=img_size), (3, img_size, img_size)).macs


def human_seconds(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} d"

"""The run is a typed spec, and the spec names the run (OpenLTH style).

`RunSpec` holds everything that decides a run's outcome: method and its resolved config,
model, dataset and split, target, seed, training recipe and measurement settings. Its
stable hash names the record; where data lives on disk is not part of it.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from sparsebench.errors import SpecError

TARGET_KINDS = ("sparsity", "flops", "none")
SEED_LIMIT = 2 ** 31
RUNTIMES = ("eager", "compile", "onnxruntime")      # what latency is timed under (measure/runtimes.py)
REALIZATIONS = ("dense", "compacted", "2:4", "auto", "csr")   # how an outcome is made runnable (measure/realize.py)
RUN_ID_READABLE_MAX = 160     # bytes; + "__" + 10 hash chars + ".json" + temp-file affixes < 255


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def coerce_scalar(value: Any, annotation: Any, where: str, keep_int: bool = True) -> Any:
    """A typed value from what a user typed (CLI text or YAML), or a one-line SpecError naming `where`.

    bool takes true/false (yes/no, on/off) only: `skip_first=2` is a mistake, not True. int takes
    whole numbers only: `batch_size=2.5` is refused. float takes any finite number, also written
    as text (YAML reads `1e-3` as a string); inf and nan are refused. With `keep_int`, an int given
    for a float stays an int, so the hashes of existing specs do not change.
    """
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise SpecError(f"bad value {value!r} for {where}; allowed: true, false")
    if annotation is int:
        number = _number(value, where, "a whole number")
        if isinstance(number, float):
            if not number.is_integer():
                raise SpecError(f"bad value {value!r} for {where}; allowed: a whole number")
            number = int(number)
        return number
    if annotation is float:
        number = _number(value, where, "a finite number")
        return number if keep_int and isinstance(number, int) else float(number)
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise SpecError(f"bad value {value!r} for {where}; allowed: text")
    return value


def _number(value: Any, where: str, allowed: str):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise SpecError(f"bad value {value!r} for {where}; allowed: {allowed}")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = int(text)
        except ValueError:
            try:
                value = float(text)
            except ValueError:
                raise SpecError(f"bad value {value!r} for {where}; allowed: {allowed}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(f"bad value {value!r} for {where}; allowed: {allowed} (not inf or nan)")
    return value


def coerce_typed(value: Any, annotation: Any, where: str, keep_int: bool = True) -> Any:
    """`coerce_scalar` for Optional[X] and Tuple[X, ...] as well."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
            return None
        annotation = [a for a in typing.get_args(annotation) if a is not type(None)][0]
        origin = typing.get_origin(annotation)
    if origin in (tuple, typing.Tuple):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise SpecError(f"bad value {value!r} for {where}; allowed: a list")
        inner = (typing.get_args(annotation) or (str,))[0]
        return tuple(coerce_scalar(v, inner, where, keep_int) for v in items)
    return coerce_scalar(value, annotation, where, keep_int)


def _check_fields(obj, section: str, ranges: Dict[str, Tuple[Optional[float], Optional[float], str]]) -> None:
    """Coerce every field of a frozen spec dataclass to its annotation, then check its range.

    `ranges[name] = (low, high, kind)`: kind is "[]", "[)", "()" or "(]" for the closed / open ends;
    None for an end without a bound.
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        where = f"{section} {f.name}"
        value = coerce_typed(getattr(obj, f.name), hints[f.name], where)
        object.__setattr__(obj, f.name, value)
        if f.name not in ranges or value is None:
            continue
        low, high, kind = ranges[f.name]
        for v in (value if isinstance(value, tuple) else (value,)):
            ok = ((low is None or (v >= low if kind[0] == "[" else v > low))
                  and (high is None or (v <= high if kind[1] == "]" else v < high)))
            if not ok:
                raise SpecError(f"{section} {f.name}={v!r} is out of range; allowed: {_range_text(f.name, low, high, kind)}")


def _range_text(name: str, low, high, kind: str) -> str:
    if high is None:
        return f"{name} {'>=' if kind[0] == '[' else '>'} {low:g}"
    if low is None:
        return f"{name} {'<=' if kind[1] == ']' else '<'} {high:g}"
    return f"{low:g} {'<=' if kind[0] == '[' else '<'} {name} {'<=' if kind[1] == ']' else '<'} {high:g}"


_HINTS: Dict[type, Dict[str, Any]] = {}


def _hints(cls) -> Dict[str, Any]:
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]



@dataclass(frozen=True)
class Target:
    """`sparsity=0.9`: 90 % of prunable weights are zero. `flops=0.5`: keep 50 % of dense MACs."""

    kind: str = "none"
    value: Optional[float] = None

    def __post_init__(self):
        if self.kind not in TARGET_KINDS:
            raise SpecError(f"unknown target kind {self.kind!r}; allowed: sparsity, flops")
        if self.kind == "none":
            if self.value is not None:
                raise SpecError("target 'none' takes no value")
            return
        if self.value is not None:
            object.__setattr__(self, "value", coerce_scalar(self.value, float, f"target {self.kind}"))
        if self.value is None or not (0.0 < float(self.value) < 1.0):
            raise SpecError(f"target {self.kind}={self.value} is out of range; allowed: 0 < {self.kind} < 1")

    @classmethod
    def parse(cls, text: str) -> "Target":
        """Parse `sparsity=0.9`, `flops=0.5` or `none`."""
        text = str(text).strip()
        if text in ("none", "dense", ""):
            return cls()
        kind, sep, value = text.partition("=")
        if not sep:
            raise SpecError(f"bad target {text!r}; expected sparsity=S or flops=F with 0 < S, F < 1")
        try:
            number = float(value)
        except ValueError:
            raise SpecError(f"bad target value {value!r} in {text!r}; expected a number in (0, 1)") from None
        return cls(kind.strip(), number)

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}={self.value:g}"


@dataclass(frozen=True)
class Recipe:
    """Training recipe shared by every method in a comparison (protocol §3)."""

    batch_size: int = 64
    pretrain_epochs: float = 10.0     # dense checkpoint; also the scratch methods' budget
    finetune_epochs: float = 2.0      # identical fine-tune for every method that prunes
    search_epochs: float = 1.0        # budget of methods that search on a trained model
    optimizer: str = "sgd"            # sgd | adamw
    lr: float = 0.05
    finetune_lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_fraction: float = 0.05
    evals_per_epoch: float = 1.0      # validation checks used for model selection
    precision: str = "fp32"           # fp32 | bf16 (autocast; master weights, masks and optimizer stay fp32)
    # Most images one forward/backward takes on one device: a larger batch runs as micro-batches of at
    # most this size whose gradients add up to the whole batch's (one optimizer step per batch; BatchNorm
    # normalises each micro-batch on its own). None: the whole batch at once.
    device_batch: Optional[int] = None
    compile: bool = False             # torch.compile the model's training forward

    def __post_init__(self):
        _check_fields(self, "recipe", {
            "batch_size": (1, None, "[)"), "lr": (0, None, "()"), "finetune_lr": (0, None, "()"),
            "pretrain_epochs": (0, None, "[)"), "finetune_epochs": (0, None, "[)"), "search_epochs": (0, None, "[)"),
            "momentum": (0, 1, "[)"), "weight_decay": (0, None, "[)"), "label_smoothing": (0, 1, "[)"),
            "warmup_fraction": (0, 1, "[]"), "evals_per_epoch": (0, None, "()"), "device_batch": (1, None, "[)"),
        })
        if self.optimizer not in ("sgd", "adamw"):
            raise SpecError(f"unknown optimizer {self.optimizer!r}; allowed: sgd, adamw")
        if self.precision not in ("fp32", "bf16"):
            raise SpecError(f"unknown precision {self.precision!r}; allowed: fp32, bf16")

    def steps(self, epochs: float, n_train: int) -> int:
        return int(math.ceil(epochs * math.ceil(n_train / self.batch_size)))

    def micro_batches(self, batch: int) -> int:
        """How many forward/backward passes one optimizer step over `batch` images takes."""
        return 1 if self.device_batch is None else max(1, math.ceil(batch / self.device_batch))


# Recipe fields added after records were first written: left out of a spec's dict while they hold these
# values, so the hashes (and names) of every run that does not set them stay as they were.
RECIPE_OMITTED_DEFAULTS = {"device_batch": None, "compile": False}


def recipe_dict(recipe: Recipe) -> Dict[str, Any]:
    """The recipe as a spec stores it (`RECIPE_OMITTED_DEFAULTS` left out when unset)."""
    d = dataclasses.asdict(recipe)
    for name, default in RECIPE_OMITTED_DEFAULTS.items():
        if d[name] == default:
            del d[name]
    return d


@dataclass(frozen=True)
class DataSpec:
    img_size: Optional[int] = None    # None: the dataset's native resolution
    val_fraction: float = 0.1
    split_seed: int = 0
    workers: int = 0                  # DataLoader workers (augmentation streams depend on it)

    def __post_init__(self):
        _check_fields(self, "data", {"workers": (0, None, "[)"), "val_fraction": (0, 1, "()"),
                                     "img_size": (8, None, "[)"), "split_seed": (0, None, "[)")})


@dataclass(frozen=True)
class MeasureSpec:
    latency: bool = True
    batch_sizes: Tuple[int, ...] = (1, 64)
    threads: int = 1                  # torch threads for timing (and training)
    min_run_time: float = 0.1         # seconds per timed block (torch.utils.benchmark)
    rounds: int = 6                   # alternating dense/realized blocks (even: each model leads equally often)
    dtype: str = "float32"            # float32 | bfloat16 | float16
    channels_last: bool = False
    compile: bool = False             # time torch.compile'd models (a separate, recorded mode)

    def __post_init__(self):
        _check_fields(self, "measure", {"threads": (1, None, "[)"), "batch_sizes": (1, None, "[)"),
                                        "min_run_time": (0, None, "()"), "rounds": (1, None, "[)")})
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SpecError(f"unknown dtype {self.dtype!r}; allowed: float32, bfloat16, float16")
        if not self.batch_sizes:
            raise SpecError(f"measure batch_sizes={self.batch_sizes} is empty; allowed: positive integers")


@dataclass(frozen=True)
class RunSpec:
    method: str
    model: str
    dataset: str
    target: Target = field(default_factory=Target)
    seed: int = 0
    method_args: Tuple[Tuple[str, Any], ...] = ()   # the method's resolved Config, sorted
    model_args: Tuple[Tuple[str, Any], ...] = ()
    recipe: Recipe = field(default_factory=Recipe)
    data: DataSpec = field(default_factory=DataSpec)
    measure: MeasureSpec = field(default_factory=MeasureSpec)
    pretrained: Optional[str] = None  # weights the dense checkpoint starts from (hash-named)
    # A third-party method's distribution, version and source hash, so editing the plugin
    # re-runs its runs. Empty for built-in methods, which the code version already names.
    plugin: Tuple[Tuple[str, Any], ...] = ()

    def __post_init__(self):
        seed = coerce_scalar(self.seed, int, "seed")
        if not 0 <= seed < SEED_LIMIT:      # torch and numpy generators take 64-bit seeds; loaders use seed * 3 + i
            raise SpecError(f"seed={seed} is out of range; allowed: 0 <= seed < 2**31")
        object.__setattr__(self, "seed", seed)

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target"] = {"kind": self.target.kind, "value": self.target.value}
        d["method_args"] = dict(self.method_args)
        d["model_args"] = dict(self.model_args)
        d["recipe"] = recipe_dict(self.recipe)
        # left out when empty, so the hashes (and record names) of built-in runs stay as they were
        plugin = d.pop("plugin")
        if plugin:
            d["plugin"] = dict(plugin)
        return d

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "RunSpec":
        measure = dict(d.get("measure", {}))
        if "batch_sizes" in measure:
            measure["batch_sizes"] = tuple(measure["batch_sizes"])
        return cls(
            method=d["method"], model=d["model"], dataset=d["dataset"],
            target=Target(**d.get("target", {})), seed=d.get("seed", 0),
            method_args=tuple(sorted(d.get("method_args", {}).items())),
            model_args=tuple(sorted(d.get("model_args", {}).items())),
            recipe=Recipe(**d.get("recipe", {})), data=DataSpec(**d.get("data", {})),
            measure=MeasureSpec(**measure), pretrained=d.get("pretrained"),
            plugin=tuple(sorted((d.get("plugin") or {}).items())),
        )

    @property
    def hash(self) -> str:
        return stable_hash(self.to_dict())

    @property
    def run_id(self) -> str:
        """Readable fields plus the spec hash; the readable part is cut so that the record's file
        name (and its temp file) stays well inside NAME_MAX (255 bytes) whatever the names are."""
        target = str(self.target).replace("=", "")
        readable = f"{self.method}__{self.model}__{self.dataset}__{target}__s{self.seed}"
        data = readable.encode()
        if len(data) > RUN_ID_READABLE_MAX:
            readable = data[:RUN_ID_READABLE_MAX].decode(errors="ignore")
        return f"{readable}__{self.hash[:10]}"

    def dense_key(self) -> Dict[str, Any]:
        """What decides the dense checkpoint: shared by every method of the same (model, data, seed)."""
        r = self.recipe
        # a compiled forward computes in another order; micro-batches normalise BatchNorm on fewer images
        changed = {k: v for k, v in recipe_dict(r).items() if k in RECIPE_OMITTED_DEFAULTS}
        return {
            "model": self.model, "model_args": dict(self.model_args), "dataset": self.dataset,
            "data": dataclasses.asdict(self.data), "seed": self.seed, "pretrained": self.pretrained,
            "recipe": {**{k: getattr(r, k) for k in ("batch_size", "pretrain_epochs", "optimizer", "lr", "momentum",
                                                     "weight_decay", "label_smoothing", "warmup_fraction",
                                                     "evals_per_epoch", "precision")}, **changed},
        }


def stable_hash(obj: Any) -> str:
    """SHA-256 of canonical JSON: key order, tuples vs lists and float repr do not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

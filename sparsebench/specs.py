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
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

from sparsebench.errors import SpecError

TARGET_KINDS = ("sparsity", "flops", "none")


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
        if self.value is None or not (0.0 < float(self.value) < 1.0) or math.isnan(float(self.value)):
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

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adamw"):
            raise SpecError(f"unknown optimizer {self.optimizer!r}; allowed: sgd, adamw")
        if self.precision not in ("fp32", "bf16"):
            raise SpecError(f"unknown precision {self.precision!r}; allowed: fp32, bf16")
        for name in ("batch_size", "lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise SpecError(f"recipe {name}={getattr(self, name)} must be > 0")
        for name in ("pretrain_epochs", "finetune_epochs", "search_epochs"):
            if getattr(self, name) < 0:
                raise SpecError(f"recipe {name}={getattr(self, name)} must be >= 0")

    def steps(self, epochs: float, n_train: int) -> int:
        return int(math.ceil(epochs * math.ceil(n_train / self.batch_size)))


@dataclass(frozen=True)
class DataSpec:
    img_size: Optional[int] = None    # None: the dataset's native resolution
    val_fraction: float = 0.1
    split_seed: int = 0
    workers: int = 0                  # DataLoader workers (augmentation streams depend on it)

    def __post_init__(self):
        if self.workers < 0:
            raise SpecError(f"workers={self.workers} must be >= 0")
        if not 0.0 < self.val_fraction < 1.0:
            raise SpecError(f"val_fraction={self.val_fraction} is out of range; allowed: 0 < val_fraction < 1")
        if self.img_size is not None and self.img_size < 8:
            raise SpecError(f"img_size={self.img_size} is too small; allowed: >= 8")


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
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise SpecError(f"unknown dtype {self.dtype!r}; allowed: float32, bfloat16, float16")
        if self.threads < 1:
            raise SpecError(f"threads={self.threads} must be >= 1")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise SpecError(f"batch_sizes={self.batch_sizes} must be positive integers")


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

    def to_dict(self) -> Dict[str, Any]:
        d = dataclasses.asdict(self)
        d["target"] = {"kind": self.target.kind, "value": self.target.value}
        d["method_args"] = dict(self.method_args)
        d["model_args"] = dict(self.model_args)
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
        target = str(self.target).replace("=", "")
        return f"{self.method}__{self.model}__{self.dataset}__{target}__s{self.seed}__{self.hash[:10]}"

    def dense_key(self) -> Dict[str, Any]:
        """What decides the dense checkpoint: shared by every method of the same (model, data, seed)."""
        r = self.recipe
        return {
            "model": self.model, "model_args": dict(self.model_args), "dataset": self.dataset,
            "data": dataclasses.asdict(self.data), "seed": self.seed, "pretrained": self.pretrained,
            "recipe": {k: getattr(r, k) for k in ("batch_size", "pretrain_epochs", "optimizer", "lr", "momentum",
                                                   "weight_decay", "label_smoothing", "warmup_fraction",
                                                   "evals_per_epoch", "precision")},
        }


def stable_hash(obj: Any) -> str:
    """SHA-256 of canonical JSON: key order, tuples vs lists and float repr do not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()

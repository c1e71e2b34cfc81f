"""The run record: one typed dataclass, and the only code that turns it into JSON and back.

Everything that reads records (leaderboards, plots, the CLI) reads `RunRecord`s through
`RunRecord.from_dict`, never raw JSON keys. The JSON form keeps the field names of the
words in docs/design.md (`achieved_sparsity`, `achieved_flops_ratio`, ...).

Schema 2 added to schema 1: `status`, `target_met`, `tolerance`, `prunable`, `plugin` and
`error`. Schema 3 (this module) adds `mechanism` (did the method's defining mechanism act,
with the numbers that show it), `curves` (training loss, learning rate, validation
accuracy and mask/structure events against step, per training stage) and `per_sample`
(each test sample's top-1 correctness, packed bits, keyed to the test set's identity so
that two records pair only when they saw the same samples; `PerSample`). Older records are
upgraded on read: schema 1 gets its status from the default tolerances and an unknown
prunable policy; schemas 1 and 2 get `mechanism` and `curves` as "not recorded" (None).
Any other schema is refused with a one-line reason. Three optional schema-3 fields came later
and read as None where absent: `artifact` (the saved model file and its SHA-256), `retimed`
(latency re-measured from that file on other devices, keyed by device) and `sparsity_pattern`
(the N:M pattern a method declared for its masks, "2:4"; the only way to the 2:4 kernels).
`resources` came later still (CPU, memory, /dev/shm, GPU use and the loader wait fraction per
training stage) and reads as None where absent.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

SCHEMA_VERSION = 3
STATUSES = ("ok", "diverged", "missed_target", "failed")
# Runs with a result to rank; diverged and failed runs have none (their metrics are None).
RESULT_STATUSES = ("ok", "missed_target")

SPARSITY_TOLERANCE = 0.005          # either side of a sparsity target
FLOPS_TOLERANCE = (0.03, 0.01)      # (below, above) a FLOPs-ratio target


class RecordError(ValueError):
    """A JSON document that is not a readable run record; the message says why in one line."""


RETIMED_SUFFIX = " · retimed"     # a re-timing's label on the run's own device (older records)


def _timed_entries(device: str, source: str, created: Optional[str], kind: Optional[str], realizable: bool,
                   reason: Optional[str], details: Dict[str, Any], latency: Optional[Dict[str, Any]],
                   runtime: Optional[str] = None) -> List[Dict[str, Any]]:
    """The flat entries of one latency table (`latency`: per-batch results and "settings")."""
    settings = (latency or {}).get("settings") or {}
    runtime = runtime or settings.get("runtime") or ("compile" if settings.get("compile") else "eager")
    base = {"device": device, "runtime": runtime, "realization": kind, "source": source, "created": created,
            "dtype": settings.get("dtype"), "threads": settings.get("threads")}
    batches = sorted((k for k in (latency or {}) if str(k).isdigit()), key=int)
    if not realizable or not batches:
        why = reason or ("not timed (latency off, or not the primary rank)" if realizable else None)
        return [{**base, "batch": None, "measured_speedup": None, "speedup_ci95": None, "dense_ms": None,
                 "realized_ms": None, "sparse_layers": details.get("sparse_layers"), "status": why or "not timed"}]
    out = []
    for key in batches:
        t = latency[key]
        at_batch = t.get("realization") or {}            # auto chosen again at this batch
        out.append({**base, "batch": int(key), "measured_speedup": t.get("measured_speedup"),
                    "speedup_ci95": t.get("speedup_ci95"), "dense_ms": t.get("dense_ms"),
                    "realized_ms": t.get("realized_ms"),
                    "sparse_layers": at_batch.get("sparse_layers", details.get("sparse_layers")),
                    "status": "measured" if t.get("measured_speedup") is not None else "not timed"})
    return out


def device_label(environment: Dict[str, Any]) -> str:
    """How records and tables name the device of an environment (`measure.environment`):
    "cpu: <CPU model>" or "cuda: <GPU name>"."""
    kind = str(environment.get("device", "cpu")).split(":")[0]
    return f"{kind}: {environment.get('device_name') or environment.get('cpu') or 'unknown'}"


@dataclass(frozen=True)
class Tolerance:
    """A target is met when target - below <= achieved <= target + above."""

    below: float
    above: float

    def admits(self, target: float, achieved: float) -> bool:
        return achieved is not None and not math.isnan(achieved) and target - self.below <= achieved <= target + self.above


@dataclass(frozen=True)
class Macs:
    dense: int
    realized: int
    effective: int
    attention: int
    flops_dense: int
    flops_effective: int
    input_size: List[int]
    batch: int
    convention: str
    effective_is: str                 # theoretical (masked zeros) | realized (a smaller model)


@dataclass(frozen=True)
class Params:
    dense: int
    total: int
    nonzero: int
    prunable_tensors: int


@dataclass(frozen=True)
class Cost:
    method_steps: int
    method_budget_steps: int
    method_wall_seconds: float
    finetune_steps: int
    finetune_wall_seconds: float
    dense_pretrain_steps: int
    dense_pretrain_wall_seconds: float
    # forward/backward MACs spent: {"method": {...}, "finetune": {...}, "dense_pretrain": {...}, "convention": str}
    train_macs: Optional[dict] = None
    resumed_fits: int = 0              # fits loaded from a checkpoint after an interruption


@dataclass(frozen=True)
class Realization:
    realizable: bool
    kind: Optional[str]
    reason: Optional[str]
    dtype: Optional[str]
    # 2:4 counts, backend; auto/csr: summary, sparse_layers, calibration, per-layer choices (layers); flat in JSON
    details: Dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Prunable:
    """Which weights the sparsity is stated over. `policy` names the choice; `dense_layers`
    are the model card's input layer / classifier the method left out of the set."""

    policy: str                       # all conv/linear | input layer and classifier dense | ... | unknown
    dense_layers: List[str]
    tensors: int


@dataclass(frozen=True)
class Mechanism:
    """Whether a run's defining mechanism acted, and the numbers that show it.

    declared    False for a baseline: it has no mechanism beyond its criterion (acted is None)
    acted       the verdict against the method's declared thresholds (None: no mechanism)
    reason      one line: which number decided the verdict
    control     True for a null control: the method with its mechanism switched off
    signal_control  the name of the method's signal control this run is (its informative signal
                replaced by noise, `Method.signal_controls`); None otherwise (and in older records)
    metrics     the method's telemetry (units moved, score changes, swaps per update, ...)
    thresholds  {metric: minimum} the verdict was judged against, as the method declares them
    """

    declared: bool
    acted: Optional[bool]
    reason: str
    control: bool = False
    metrics: Dict[str, Any] = field(default_factory=dict)
    thresholds: Dict[str, Any] = field(default_factory=dict)
    signal_control: Optional[str] = None

    @property
    def label(self) -> str:
        """One word for tables: acted | did not act | control | signal control | none."""
        if self.control:
            return "control"
        if self.signal_control:
            return "signal control"
        if not self.declared:
            return "none"
        return "acted" if self.acted else "did not act"

    @property
    def verdict(self) -> str:
        """What the mechanism did, for a summary line: "acted", "did not act: <which number>", the
        null control's own line, or "baseline: no mechanism"."""
        if self.control or self.signal_control or (self.declared and not self.acted):
            return self.reason
        return "acted" if self.declared else "baseline: no mechanism"


@dataclass(frozen=True)
class PerSample:
    """Each test sample's top-1 correctness, in the test loader's (fixed) order.

    test_set  what makes two evaluations comparable sample by sample: dataset, split seed,
              sample count and the SHA-256 of the labels in order
    correct   numpy.packbits of the booleans, base64 (450 samples: 76 characters; 50,000: 8.4 KB)
    """

    test_set: Dict[str, Any]
    correct: str
    encoding: str = "numpy.packbits, big-endian bit order, base64"

    @classmethod
    def of(cls, correct, labels, dataset: str, split_seed: int) -> "PerSample":
        import base64
        import hashlib

        import numpy as np

        hits = np.asarray(correct, dtype=bool)
        label_bytes = np.asarray(labels, dtype=np.int64).tobytes()
        test_set = {"dataset": dataset, "split_seed": int(split_seed), "n": int(hits.size),
                    "labels_sha256": hashlib.sha256(label_bytes).hexdigest()}
        return cls(test_set, base64.b64encode(np.packbits(hits).tobytes()).decode("ascii"))

    def vector(self):
        """The per-sample correctness as a numpy bool array of length test_set["n"]."""
        import base64

        import numpy as np

        bits = np.unpackbits(np.frombuffer(base64.b64decode(self.correct), dtype=np.uint8))
        return bits[: self.test_set["n"]].astype(bool)

    def unpairable_with(self, other: "PerSample") -> Optional[str]:
        """None when the two evaluations saw the same samples in the same order, else why not (one line)."""
        for key in ("dataset", "split_seed", "n", "labels_sha256"):
            if self.test_set.get(key) != other.test_set.get(key):
                return (f"different test sets: {key} {self.test_set.get(key)!r} vs {other.test_set.get(key)!r}")
        return None


def threshold_bound(threshold: Any) -> Tuple[str, float]:
    """(op, bound) of a mechanism threshold: `[op, bound]` / `(op, bound)`, or a bare minimum."""
    if isinstance(threshold, (list, tuple)):
        op, bound = threshold
        return str(op), bound
    return ">=", threshold


def meets_threshold(value: Any, threshold: Any) -> bool:
    """Whether a telemetry value reaches its threshold (a missing value never does)."""
    op, bound = threshold_bound(threshold)
    return value is not None and (value >= bound if op == ">=" else value <= bound)


# Nested fields with a type of their own; the rest are JSON scalars, lists or free dicts.
_NESTED = {"macs": Macs, "params": Params, "cost": Cost, "prunable": Prunable, "tolerance": Tolerance,
           "mechanism": Mechanism, "per_sample": PerSample}
# None only in a run without a result (diverged, failed).
_RESULT_FIELDS = ("achieved_sparsity", "achieved_sparsity_all_params", "achieved_flops_ratio", "test_top1",
                  "val_top1", "test_samples", "params", "macs", "theoretical_speedup", "realization", "prunable")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    spec_hash: str
    spec: Dict[str, Any]
    method: str
    model: str
    dataset: str
    seed: int
    model_family: str
    granularity: str
    starts_from: str
    target_kind: str                  # JSON: target.kind
    target_value: Optional[float]     # JSON: target.value
    status: str                       # ok | diverged | missed_target | failed
    target_met: bool
    tolerance: Optional[Tolerance]    # None for the dense reference (no target)
    achieved_sparsity: Optional[float]
    achieved_sparsity_all_params: Optional[float]
    achieved_flops_ratio: Optional[float]
    test_top1: Optional[float]
    test_top5: Optional[float]
    val_top1: Optional[float]
    test_samples: Optional[int]
    dense_test_top1: float
    dense_val_top1: float
    params: Optional[Params]
    macs: Optional[Macs]
    theoretical_speedup: Optional[float]
    measured_speedup: Optional[float]
    measured_speedup_batch: Optional[int]
    realization: Optional[Realization]
    latency: Optional[Dict[str, Any]]
    cost: Cost
    selection: Dict[str, Any]
    dense_checkpoint: Dict[str, Any]
    data: Dict[str, Any]
    structure: Optional[Dict[str, Any]]
    notes: Dict[str, Any]
    environment: Dict[str, Any]
    code_version: Dict[str, Any]
    created: str
    prunable: Optional[Prunable]
    plugin: Optional[Dict[str, Any]] = None   # third-party method: distribution, version, source_sha256
    error: Optional[str] = None               # why a run has no result (diverged, failed)
    mechanism: Optional[Mechanism] = None     # None: not recorded (schema < 3, or a run without a method result)
    # {stage: {"step": [...], "loss": [...], "lr": [...], "val": [[step, top1], ...], "events": [[step, kind], ...]}}
    curves: Optional[Dict[str, Any]] = None
    per_sample: Optional[PerSample] = None    # None: not recorded (schema < 3, or no result)
    # the saved model (runners/artifacts.py): {"path": "models/<run_id>.safetensors", "sha256", "bytes", ...},
    # or {"path": None, "reason": ...} when it could not be saved; None: not saved
    artifact: Optional[Dict[str, Any]] = None
    # latency re-measured later from the saved model (`sparsebench retime`), one entry per device label
    # ("cuda: NVIDIA H100 80GB HBM3"): {"device", "environment", "created", "artifact_sha256", "runs": [{"runtime",
    # "realization" (kind and details), "latency", "measured_speedup", "measured_speedup_batch", "reason"}]};
    # entries written before runtimes existed hold one eager run flat ("realization", "latency", ...). All
    # of them are read through `latency_entries`
    retimed: Optional[Dict[str, Any]] = None
    # the N:M pattern the method declared for its masks ("2:4"; `methods.base.Outcome.pattern`): only a
    # declared 2:4 is realized with 2:4 kernels. None: none declared, or a record from before the field
    sparsity_pattern: Optional[str] = None
    # what each training stage used of the machine, sampled while it stepped (measure/resources.py):
    # {"stages": {stage: {"loader_wait_fraction", "cpu_percent_mean", "rss_mb_peak", "shm_mb_peak",
    # "gpu_util_percent_mean", "gpu_mem_used_mb_peak", ...}}, "sample_seconds", "source", "gpu_source"}.
    # None: not sampled (a record from before the field, or a run that trained no step in its process)
    resources: Optional[Dict[str, Any]] = None
    schema: int = SCHEMA_VERSION

    def __post_init__(self):
        if self.status not in STATUSES:
            raise RecordError(f"status {self.status!r}; allowed: {', '.join(STATUSES)}")
        if self.has_result:
            missing = [n for n in _RESULT_FIELDS if getattr(self, n) is None]
            if missing:
                raise RecordError(f"status {self.status!r} but no {missing[0]!r}")
        elif not self.error:
            raise RecordError(f"status {self.status!r} without an 'error' saying why")

    # --- reading ---------------------------------------------------------------------------
    @property
    def has_result(self) -> bool:
        return self.status in RESULT_STATUSES

    @property
    def mechanism_acted(self) -> bool:
        """False only for a seed-method run whose record shows its mechanism did not act (a null or
        signal control's number is a control's, whatever its telemetry says)."""
        m = self.mechanism
        return m is None or m.control or bool(m.signal_control) or not m.declared or bool(m.acted)

    @property
    def is_control(self) -> bool:
        return self.mechanism is not None and self.mechanism.control

    @property
    def is_signal_control(self) -> bool:
        """A run of a method's signal control (its informative signal replaced by noise)."""
        return self.mechanism is not None and bool(self.mechanism.signal_control)

    @property
    def method_args(self) -> Dict[str, Any]:
        return dict(self.spec.get("method_args", {}))

    @property
    def device(self) -> str:
        """What the timing ran on: "cpu: <CPU model>" or "cuda: <GPU name>"."""
        return device_label(self.environment)

    def latency_entries(self) -> List[Dict[str, Any]]:
        """Every latency measurement in the record, flat, one per (device, runtime, realization, batch):
        the run's own (`latency`, on `device`) and every re-timing (`retimed`). An entry:
        device, runtime, realization (kind), sparse_layers (auto/csr: layers on CSR at that batch),
        batch, measured_speedup, speedup_ci95, dense_ms, realized_ms, status ("measured", or why
        there is no number: "not realizable here: ...", "not supported by onnxruntime: ..."), source
        ("run" or "retime"), created. A re-timing on the run's own device (label "… · retimed") is the
        same device: its entries sit beside the run's."""
        if not self.has_result:
            return []
        entries = []
        own = self.realization
        entries += _timed_entries(self.device, "run", self.created, own.kind, own.realizable, own.reason,
                                  own.details, self.latency)
        for label, retime in sorted((self.retimed or {}).items()):
            device = label[:-len(RETIMED_SUFFIX)] if label.endswith(RETIMED_SUFFIX) else label
            runs = retime.get("runs")
            if runs is None:          # written before runtimes: one eager run, flat in the entry
                runs = [retime]
            for run in runs:
                real = run.get("realization") or {}
                entries += _timed_entries(device, "retime", retime.get("created"), real.get("kind"),
                                          bool(real.get("realizable")), run.get("reason") or real.get("reason"),
                                          real, run.get("latency"), run.get("runtime"))
        return entries

    def best_latency_entry(self, device: Optional[str] = None) -> Optional[Dict[str, Any]]:
        """The fastest realization measured on `device` (default: the run's own) at its throughput
        batch (the largest batch measured there): the entry whose measured speedup is highest. None
        where nothing was measured on that device."""
        device = device or self.device
        measured = [e for e in self.latency_entries() if e["device"] == device and e["status"] == "measured"]
        if not measured:
            return None
        batch = max(e["batch"] for e in measured)
        return max((e for e in measured if e["batch"] == batch), key=lambda e: e["measured_speedup"])

    @property
    def target_label(self) -> str:
        return "none" if self.target_kind == "none" else f"{self.target_kind}={self.target_value:g}"

    # --- JSON ------------------------------------------------------------------------------
    def to_dict(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("target_kind", "target_value"):
                continue
            if f.name == "realization" and value is not None:
                value = {"realizable": value.realizable, "kind": value.kind, "reason": value.reason,
                         "dtype": value.dtype, **value.details}
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        out["target"] = {"kind": self.target_kind, "value": self.target_value}
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=_jsonable)

    @classmethod
    def from_dict(cls, d: Any) -> "RunRecord":
        """A record from its JSON form; RecordError names the first thing wrong."""
        if not isinstance(d, dict):
            raise RecordError(f"a JSON {type(d).__name__}, not a record object")
        schema = d.get("schema")
        if schema == 1:
            d = _upgrade_v1(d)
        elif schema == 2:
            d = {**d, "schema": SCHEMA_VERSION}           # mechanism, curves, per_sample: not recorded
        elif schema != SCHEMA_VERSION:
            raise RecordError(f"schema {schema!r}; this sparsebench reads schema {SCHEMA_VERSION} (and upgrades 1, 2)")
        names = {f.name for f in dataclasses.fields(cls)} - {"target_kind", "target_value"} | {"target"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise RecordError(f"unknown field {unknown[0]!r}")
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.name not in ("target_kind", "target_value")]
        missing = [n for n in required + ["target"] if n not in d]
        if missing:
            raise RecordError(f"missing field {missing[0]!r}")
        values = dict(d)
        target = values.pop("target")
        if not isinstance(target, dict) or "kind" not in target:
            raise RecordError(f"bad target {target!r}")
        values["target_kind"], values["target_value"] = target["kind"], target.get("value")
        try:
            for name, typ in _NESTED.items():
                if values.get(name) is not None:
                    values[name] = _nested(typ, values[name], name)
            if values.get("realization") is not None:
                r = dict(values["realization"])
                values["realization"] = Realization(r.pop("realizable"), r.pop("kind"), r.pop("reason"),
                                                    r.pop("dtype", None), r)
            return cls(**values)
        except (KeyError, TypeError) as e:
            raise RecordError(f"malformed field ({type(e).__name__}: {e})") from None

    @classmethod
    def from_json(cls, text: str) -> "RunRecord":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise RecordError(f"not JSON ({e.msg} at line {e.lineno})") from None
        return cls.from_dict(data)


def _nested(typ, value, where: str):
    if not isinstance(value, dict):
        raise RecordError(f"field {where!r} is {type(value).__name__}, expected an object")
    names = {f.name for f in dataclasses.fields(typ)}
    # fields with a default arrived later in schema 2 (cost.train_macs, cost.resumed_fits)
    required = {f.name for f in dataclasses.fields(typ)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    missing = sorted(n for n in required if n not in value)
    if missing:
        raise RecordError(f"missing field {where}.{missing[0]}")
    return typ(**{k: v for k, v in value.items() if k in names})


def target_check(kind: str, value: Optional[float], achieved_sparsity: Optional[float],
                 achieved_flops_ratio: Optional[float], sparsity_tolerance: float = SPARSITY_TOLERANCE,
                 flops_tolerance: Tuple[float, float] = FLOPS_TOLERANCE) -> Tuple[bool, Optional[Tolerance]]:
    """(target met, tolerance used). The dense reference has no target and always meets it."""
    if kind == "none":
        return True, None
    if kind == "sparsity":
        tolerance = Tolerance(sparsity_tolerance, sparsity_tolerance)
        return tolerance.admits(value, achieved_sparsity), tolerance
    if kind == "flops":
        tolerance = Tolerance(*flops_tolerance)
        return tolerance.admits(value, achieved_flops_ratio), tolerance
    raise RecordError(f"unknown target kind {kind!r}")


def _upgrade_v1(d: dict) -> dict:
    """A schema-1 record in schema-2 form: it always had a result; whether the target was met
    is judged with the default tolerances (schema 1 stored no method tolerance)."""
    d = dict(d)
    target = d.get("target") or {}
    met, tolerance = target_check(target.get("kind"), target.get("value"), d.get("achieved_sparsity"),
                                  d.get("achieved_flops_ratio"))
    d.update(schema=SCHEMA_VERSION, status="ok" if met else "missed_target", target_met=met,
             tolerance=dataclasses.asdict(tolerance) if tolerance else None,
             prunable={"policy": "unknown", "dense_layers": [],
                       "tensors": (d.get("params") or {}).get("prunable_tensors", 0)})
    return d


def plain(obj: Any) -> Any:
    """`obj` as JSON will give it back (tuples as lists, tensors as lists), so a record built in
    memory equals the same record read from disk."""
    return json.loads(json.dumps(obj, default=_jsonable))


def _jsonable(obj):
    import numpy as np
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")

"""Model artifacts: every run's final model, saved beside its record and rebuilt exactly.

    OUT/models/<run_id>.safetensors     weights (every parameter and buffer), the masks of a masked
                                        run, and in the file's metadata the module tree needed to
                                        rebuild a compacted model; the record's `artifact` names the
                                        file and its SHA-256

The module tree is stored as a difference from the dense model the spec names: for every module,
its class, its parameter and buffer names, its children in order and the plain attributes
(int, float, bool, str, tuples of them) that differ from the dense model's module at the same
path. A compacted CNN (torch-pruning shrinks convs and norms in place), a slimmed ViT (fewer heads,
head dims, MLP and embedding widths, whole attentions replaced by constants) and a ViT with a token
selector inserted all rebuild the same way: the dense model from the spec, reshaped by the tree,
then the tensors loaded. No pickle: the file names only classes under torch, torchvision, timm and
sparsebench, and holds only tensors and JSON.

Saving checks its own work: the model is rebuilt from what is about to be written and its outputs
must equal the original's on a batch, else nothing is written and the record says why. The file is
written atomically (temp file, fsync, rename) before the record, so a record never trusts a partial
file; a file without a record is an interrupted run's, overwritten when the run is done again.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from sparsebench.errors import ArtifactError
from sparsebench.platform import atomic_write_bytes
from sparsebench.models import create_model
from sparsebench.store.record import RecordError, RunRecord, device_label, plain
from sparsebench.store.records import RecordStore

FORMAT = "sparsebench-model/1"
MODELS_DIR = "models"
ALLOWED_PACKAGES = ("torch", "torchvision", "timm", "sparsebench")
# nn.Module's own bookkeeping: rebuilt by nn.Module.__init__ and the tensors, never stored as attributes
_MODULE_INTERNALS = {"training", "_parameters", "_buffers", "_non_persistent_buffers_set", "_modules",
                     "_backward_pre_hooks", "_backward_hooks", "_is_full_backward_hook", "_forward_hooks",
                     "_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks",
                     "_forward_pre_hooks_with_kwargs", "_state_dict_hooks", "_state_dict_pre_hooks",
                     "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks", "_compiled_call_impl"}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
CHECK_TOLERANCE = 1e-5


@dataclass
class LoadedModel:
    """A rebuilt model (eval mode), with what the artifact holds beside it."""

    model: nn.Module
    run_id: str
    realization: str                          # dense | compacted | masked
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)   # parameter name -> bool mask
    input_size: Tuple[int, ...] = ()          # (C, H, W)
    record: Optional[RunRecord] = None
    path: Optional[Path] = None
    model_kwargs: Dict[str, Any] = field(default_factory=dict)   # what the spec's model was built with


# --- the module tree --------------------------------------------------------------------------
def _class_name(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}:{cls.__qualname__}"


def _import_class(name: str):
    module_name, _, qualname = name.partition(":")
    if module_name.split(".")[0] not in ALLOWED_PACKAGES or not qualname:
        raise ArtifactError(f"class {name!r} is outside {', '.join(ALLOWED_PACKAGES)}")
    try:
        obj = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ArtifactError(f"class {name!r} is not importable here ({e})") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArtifactError(f"{name!r} is not a torch module class")
    return obj


def _plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return False


def _encode(value: Any) -> Any:
    """JSON with tuples kept apart from lists (Conv2d's kernel_size, LayerNorm's normalized_shape)."""
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(_decode(v) for v in value["tuple"])
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def _attributes(module: nn.Module) -> Dict[str, Any]:
    return {k: v for k, v in vars(module).items() if k not in _MODULE_INTERNALS}


def describe(model: nn.Module, reference: nn.Module) -> Dict[str, dict]:
    """The module tree of `model` as a difference from `reference` (the spec's dense model)."""
    ref_modules = dict(reference.named_modules(remove_duplicate=False))
    tree: Dict[str, dict] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if any(getattr(module, h, None) for h in _HOOKS):
            raise ArtifactError(f"module {path or '(root)'!r} carries hooks, which a model file cannot hold")
        ref = ref_modules.get(path)
        if ref is not None and type(ref) is not type(module):
            ref = None
        ref_attrs = _attributes(ref) if ref is not None else {}
        attrs, dropped = {}, []
        for key, value in _attributes(module).items():
            if _plain(value):
                if key not in ref_attrs or type(ref_attrs[key]) is not type(value) or ref_attrs[key] != value:
                    attrs[key] = _encode(value)
            elif isinstance(value, torch.Tensor):      # unregistered tensors are not state (telemetry, caches)
                dropped.append(key)
            elif ref is None or key not in ref_attrs:
                raise ArtifactError(f"module {path or '(root)'!r} ({type(module).__name__}) holds {key!r}, a "
                                    f"{type(value).__name__}, which a model file cannot hold")
        tree[path] = {
            "class": _class_name(module), "from_dense": ref is not None,
            "params": [[n, p is not None] for n, p in module._parameters.items()],
            "buffers": [[n, b is not None, n in module._non_persistent_buffers_set] for n, b in module._buffers.items()],
            "children": list(module._modules), "attrs": attrs, "dropped": dropped,
        }
    return tree


def rebuild(tree: Dict[str, dict], dense: nn.Module, tensors: Dict[str, torch.Tensor]) -> nn.Module:
    """The model `tree` describes, built from the dense model `dense` (consumed) and the tensors
    keyed "param/<name>" and "buffer/<name>"."""
    ref_modules = dict(dense.named_modules(remove_duplicate=False))

    def build(path: str) -> nn.Module:
        entry = tree[path]
        cls = _import_class(entry["class"])
        if entry["from_dense"]:
            module = ref_modules.get(path)
            if module is None or type(module) is not cls:
                raise ArtifactError(f"module {path or '(root)'!r} ({entry['class']}) is not in the dense model "
                                    "this sparsebench builds for the spec")
            module._parameters, module._buffers, module._modules = OrderedDict(), OrderedDict(), OrderedDict()
            module._non_persistent_buffers_set = set()
        else:
            module = cls.__new__(cls)
            nn.Module.__init__(module)
        for key in entry.get("dropped", []):
            module.__dict__[key] = None
        for key, value in entry["attrs"].items():
            module.__dict__[key] = _decode(value)
        prefix = f"{path}." if path else ""
        for name, present in entry["params"]:
            module._parameters[name] = nn.Parameter(_tensor(tensors, f"param/{prefix}{name}"), requires_grad=True) \
                if present else None
        for name, present, non_persistent in entry["buffers"]:
            module._buffers[name] = _tensor(tensors, f"buffer/{prefix}{name}") if present else None
            if non_persistent:
                module._non_persistent_buffers_set.add(name)
        for child in entry["children"]:
            module._modules[child] = build(f"{prefix}{child}")
        return module

    if "" not in tree:
        raise ArtifactError("the module tree has no root")
    return build("")


def _tensor(tensors: Dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise ArtifactError(f"tensor {key!r} is missing from the file")
    return tensors[key]


# --- writing ----------------------------------------------------------------------------------
def artifact_path(out: Path, run_id: str) -> Path:
    return Path(out) / MODELS_DIR / f"{run_id}.safetensors"


def _tensors_of(model: nn.Module, masks: Optional[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out[f"param/{name}"] = p.detach().to("cpu").contiguous().clone()
    for name, b in model.named_buffers(remove_duplicate=False):
        out[f"buffer/{name}"] = b.detach().to("cpu").contiguous().clone()
    for name, m in (masks or {}).items():
        out[f"mask/{name}"] = m.detach().to("cpu", torch.bool).contiguous().clone()
    return out


def encode_model(model: nn.Module, dense: nn.Module, model_name: str, model_kwargs: dict, realization: str,
                 run_id: str, masks: Optional[Dict[str, torch.Tensor]] = None, input_size=None) -> bytes:
    """The artifact's bytes; the model rebuilt from them must give the original's outputs."""
    from safetensors.torch import load as st_load, save as st_save

    tree = describe(model, dense)
    metadata = {"format": FORMAT, "run_id": run_id, "model": model_name, "realization": realization,
                "model_kwargs": json.dumps(model_kwargs, sort_keys=True), "modules": json.dumps(tree),
                "input_size": json.dumps(list(input_size) if input_size else None)}
    data = st_save(_tensors_of(model, masks), metadata=metadata)
    if input_size:
        rebuilt = rebuild(tree, _fresh_copy(dense), dict(st_load(data)))
        _check_same_outputs(model, rebuilt, input_size, run_id)
    return data


def _fresh_copy(dense: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(dense).cpu()


@torch.no_grad()
def _check_same_outputs(model: nn.Module, rebuilt: nn.Module, input_size, run_id: str) -> None:
    device = next(model.parameters()).device
    x = torch.randn(4, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    was_training = model.training
    model.eval()
    rebuilt.to(device).eval()
    try:
        want = model(x).float()
        got = rebuilt(x).float()
    finally:
        model.train(was_training)
    error = (want - got).abs().max().item() if want.shape == got.shape else float("inf")
    if not error <= CHECK_TOLERANCE * max(1.0, want.abs().max().item()):
        raise ArtifactError(f"run {run_id}: the model rebuilt from its artifact differs from the run's model "
                            f"(max |Δ| {error:.3g}); not saved")


def save_model(out: Path, run_id: str, model: nn.Module, dense: nn.Module, model_name: str, model_kwargs: dict,
               realization: str, masks: Optional[Dict[str, torch.Tensor]] = None, input_size=None) -> dict:
    """Write OUT/models/<run_id>.safetensors atomically; returns the record's `artifact` entry."""
    data = encode_model(model, dense, model_name, model_kwargs, realization, run_id, masks, input_size)
    path = artifact_path(out, run_id)
    atomic_write_bytes(path, data)
    return {"path": f"{MODELS_DIR}/{path.name}", "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data),
            "format": FORMAT, "realization": realization,
            "contents": ", ".join(["weights"] + ["masks"] * bool(masks)
                                  + ["compacted structure"] * (realization == "compacted"))}


# --- reading ----------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def find_run(what: str, results_dir: Optional[Path] = None) -> Tuple[Optional[RunRecord], Path, Path]:
    """(record or None, artifact file, results dir) of a run id (or unique prefix) in `results_dir`,
    a record file, or an artifact file."""
    p = Path(what)
    if p.suffix == ".safetensors" and p.is_file():
        root = p.parent.parent
        record_file = root / "records" / f"{p.stem}.json"
        return (_read_record(record_file) if record_file.is_file() else None), p, root
    if p.suffix == ".json" and p.is_file():
        record = _read_record(p)
        return record, _artifact_of(record, p.parent.parent), p.parent.parent
    root = Path(results_dir) if results_dir is not None else None
    if root is None or not (root / "records").is_dir():
        raise ArtifactError(f"no run {what!r}: not a .safetensors or record file, and no results directory "
                            f"{str(root)!r} with records/ to look it up in")
    store = RecordStore(root)
    if store.exists(what):
        record = store.read(what)
    else:
        matches = sorted(q.stem for q in store.records_dir.glob(f"{glob.escape(what)}*.json"))
        if len(matches) != 1:
            raise ArtifactError(f"no run {what!r} in {str(root)!r}" if not matches else
                                f"run {what!r} is ambiguous in {str(root)!r}: {', '.join(matches[:3])}, ...")
        record = store.read(matches[0])
    return record, _artifact_of(record, root), root


def _read_record(path: Path) -> RunRecord:
    try:
        return RunRecord.from_json(path.read_text())
    except (RecordError, OSError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{str(path)!r} is not a readable run record ({e})") from None


def _artifact_of(record: RunRecord, root: Path) -> Path:
    if not record.artifact or not record.artifact.get("path"):
        why = (record.artifact or {}).get("reason") or "the run was made without saving models (--no-save-models, " \
                                                         "or before models were saved)"
        raise ArtifactError(f"run {record.run_id}: no saved model ({why})")
    return root / record.artifact["path"]


def load_artifact(what, results_dir: Optional[Path] = None, device: str = "cpu") -> LoadedModel:
    """Rebuild a run's model from its artifact, checked against the record's SHA-256."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    record, path, _ = find_run(str(what), results_dir)
    run_id = record.run_id if record is not None else path.stem
    if not path.is_file():
        raise ArtifactError(f"run {run_id}: model file {str(path)!r} is missing")
    data = path.read_bytes()
    if record is not None and record.artifact.get("sha256"):
        digest = hashlib.sha256(data).hexdigest()
        if digest != record.artifact["sha256"]:
            raise ArtifactError(f"run {run_id}: model file {str(path)!r} does not match the record's SHA-256 "
                                f"({digest[:12]}… ≠ {record.artifact['sha256'][:12]}…): truncated, corrupt or replaced")
    try:
        tensors = st_load(data)
        metadata = _metadata(data)
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise ArtifactError(f"run {run_id}: model file {str(path)!r} is not a readable safetensors file "
                            f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if metadata.get("format") != FORMAT or "modules" not in metadata or "model_kwargs" not in metadata:
        raise ArtifactError(f"run {run_id}: model file {str(path)!r} lacks the module structure "
                            f"(format {metadata.get('format')!r}; expected {FORMAT!r})")
    try:
        tree = json.loads(metadata["modules"])
        kwargs = json.loads(metadata["model_kwargs"])
        input_size = tuple(json.loads(metadata.get("input_size") or "null") or ())
        model = rebuild(tree, create_model(metadata["model"], **kwargs), tensors)
    except ArtifactError as e:
        raise ArtifactError(f"run {run_id}: model file {str(path)!r}: {e}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"run {run_id}: model file {str(path)!r} has a malformed structure "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    masks = {k[len("mask/"):]: v for k, v in tensors.items() if k.startswith("mask/")}
    return LoadedModel(model.to(device).eval(), run_id, metadata.get("realization", "masked"), masks, input_size,
                       record, path, kwargs)


def _metadata(data: bytes) -> dict:
    """The safetensors header's `__metadata__` (the header: 8-byte little-endian length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("header longer than the file")
    return json.loads(data[8:8 + n]).get("__metadata__") or {}


# --- evaluating -------------------------------------------------------------------------------
def evaluate_loaded(loaded: LoadedModel, data_root: Optional[str] = None, device: str = "cpu"):
    """Test accuracy of a loaded model on the run's own test split, evaluated as the pipeline does
    (same split, order and batch); an `Accuracy`."""
    from sparsebench.datasets import create_dataset
    from sparsebench.training.loading import EVAL_BATCH, device_loader
    from sparsebench.training.trainer import evaluate

    record = loaded.record
    if record is None:
        raise ArtifactError(f"run {loaded.run_id}: no record beside the model file, so no test split to evaluate on")
    d = record.spec["data"]
    data = create_dataset(record.dataset, data_root, d.get("img_size"), d.get("val_fraction", 0.1),
                          d.get("split_seed", 0), False)
    loader = device_loader(data.test, device, data.info.mean, data.info.std, batch_size=EVAL_BATCH)
    return evaluate(loaded.model.to(device).eval(), loader, torch.device(device), data.info.num_classes,
                    precision=record.spec.get("recipe", {}).get("precision", "fp32"))


# --- re-timing --------------------------------------------------------------------------------
@dataclass
class RetimeResult:
    retimed: List[str] = field(default_factory=list)       # run ids given a new entry
    without_model: List[str] = field(default_factory=list)  # records with no saved model
    errors: List[str] = field(default_factory=list)         # one line per run whose model could not be used
    left_for_time: List[str] = field(default_factory=list)  # run ids not reached within max_seconds


def _run_key(run: dict) -> tuple:
    """What a re-timing run replaces: the one before it under the same runtime and realization."""
    return (run.get("runtime") or "eager", (run.get("realization") or {}).get("kind") or run.get("kernel"))


def retime_directory(root: Path, device: str, dtype: Optional[str] = None, batch_sizes=None,
                     threads: Optional[int] = None, progress=None,
                     max_seconds: Optional[float] = None, runtimes: Sequence[str] = ("eager",),
                     realizations: Sequence[str] = ("auto",)) -> RetimeResult:
    """Re-measure dense vs realized latency of every saved model under `root` on `device`, with the
    run's own protocol settings (dtype and batch sizes may be overridden), under each of `runtimes`
    and, for unstructured masks, each of `realizations` ("auto", "csr"; dense, compacted and declared
    2:4 models have one realization of their own). Each record's `retimed` entry for the device keeps
    one run per (runtime, realization): a new one replaces the old of the same key, others stay.
    No other field of a record changes; a run whose model is missing or corrupt is reported and left
    as it is. With `max_seconds`, each timing gets an equal share of the time left
    (`LatencySettings.max_seconds`) and runs not reached in time are listed in `left_for_time`,
    their records unchanged."""
    import dataclasses
    import datetime as dt
    import time

    from sparsebench.measure.environment import environment
    from sparsebench.measure.latency import LatencySettings
    from sparsebench.measure.realize import compare_realized, realize
    from sparsebench.measure.runtimes import RuntimeUnsupported, check_runtime
    from sparsebench.measure.unstructured import KERNELS, Calibration

    for runtime in runtimes:
        check_runtime(runtime)
    for kernel in realizations:
        if kernel not in KERNELS:
            raise ValueError(f"unknown realization {kernel!r} of unstructured masks; allowed: {', '.join(KERNELS)}")
    store = RecordStore(root)
    result = RetimeResult()
    target = torch.device(device)
    deadline = None if max_seconds is None else time.perf_counter() + max_seconds
    with_result = [r for r in store.load_all() if r.has_result]
    result.without_model = [r.run_id for r in with_result if not r.artifact or not r.artifact.get("path")]
    todo = [r for r in with_result if r.run_id not in result.without_model]
    for i, record in enumerate(todo):
        left = None if deadline is None else deadline - time.perf_counter()
        if left is not None and left <= 0:
            result.left_for_time = [r.run_id for r in todo[i:]]
            break
        try:
            loaded = load_artifact(str(store.path(record.run_id)), root, "cpu")
        except ArtifactError as e:
            result.errors.append(str(e))
            continue
        m = dict(record.spec.get("measure", {}))
        use_dtype = dtype or m.get("dtype", "float32")
        use_threads = threads or m.get("threads", 1)
        sizes = tuple(batch_sizes or m.get("batch_sizes", (1, 64)))
        calibration = Calibration(input_size=tuple(loaded.input_size), batch=max(sizes), threads=use_threads)
        unstructured = loaded.realization == "masked" and record.sparsity_pattern != "2:4"
        kernels = tuple(realizations) if unstructured else ("auto",)   # the kernel is unused for the others
        env = environment(target, use_threads)
        label = device_label(env) + ("" if use_dtype == m.get("dtype", "float32") else f" · {use_dtype}")
        runs = []
        torch.manual_seed(0)
        dense = create_model(record.model, **loaded.model_kwargs).to(target).eval()   # timing does not read the weights
        timings_here = len(kernels) * len(runtimes)
        for kernel in kernels:
            realized = realize(loaded.model.to(target), loaded.realization, target, use_dtype,
                               record.sparsity_pattern, calibration=calibration, kernel=kernel)
            for runtime in runtimes:
                run = {"runtime": runtime, "kernel": kernel,
                       "realization": plain(realized.as_dict()),   # with auto's choices on this device
                       "latency": None, "measured_speedup": None, "measured_speedup_batch": None,
                       "reason": None if realized.realizable else realized.reason}
                runs.append(run)
                if not realized.realizable:
                    continue
                now_left = None if deadline is None else max(0.0, deadline - time.perf_counter())
                settings = LatencySettings(batch_sizes=sizes, threads=use_threads,
                                           min_run_time=m.get("min_run_time", 0.1), rounds=m.get("rounds", 6),
                                           dtype=realized.dtype, channels_last=m.get("channels_last", False),
                                           runtime=runtime,
                                           max_seconds=None if now_left is None else
                                           now_left / (len(todo) - i) / timings_here / len(sizes))
                try:
                    latency = compare_realized(dense, loaded.model, realized, loaded.input_size, settings, target,
                                               record.sparsity_pattern, calibration)
                except RuntimeUnsupported as e:
                    run["reason"] = str(e)
                    continue
                latency["settings"] = {"dtype": realized.dtype, "threads": use_threads, "batch_sizes": list(sizes),
                                       "channels_last": settings.channels_last, "runtime": runtime,
                                       "device": str(target), "dense": "the spec's dense architecture (latency "
                                       "does not depend on weight values)",
                                       "protocol": "alternating blocks, median; CPU torch.utils.benchmark, CUDA events"}
                batch = max(sizes)
                run.update(latency=latency, measured_speedup=latency[str(batch)]["measured_speedup"],
                           measured_speedup_batch=batch)
        before = (record.retimed or {}).get(label) or {}
        earlier_runs = before.get("runs", [before] if before.get("latency") else [])   # older entries: one flat run
        keys = {_run_key(r) for r in runs}
        earlier = [r for r in earlier_runs if _run_key(r) not in keys]
        entry = {"device": label, "environment": json.loads(json.dumps(env, default=str)),
                 "artifact_sha256": record.artifact.get("sha256"), "runs": earlier + runs,
                 "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
        store.write(dataclasses.replace(record, retimed={**(record.retimed or {}), label: entry}))
        result.retimed.append(record.run_id)
        if progress is not None:
            progress(record, runs)
    return result

"""`sparsebench sweep SUITE --rehearse --out DIR`: every setting of a suite at its real size, measured.

Where `--smoke` checks that every entry runs (tiny models, 16 px), a rehearsal answers what a
paper-scale sweep will cost and whether it fits the machine, before anyone pays for it. Each
(method and arguments, model, dataset) of the suite runs once, at its first target and seed
(`rehearsal_settings`; with `cover="pairs"` each (method, model) pair once, every dataset of a
model read at least once), through the real pipeline (dense checkpoint, method, fine-tune,
evaluation, realization and latency, saved model, record):

- at the suite's **real model and resolution** (no tiny variant, the suite's `img_size`), the
  suite's optimizer, learning rates and method arguments;
- on **fabricated data in the dataset's real on-disk format with images at real sizes**
  (`datasets.replicas.fabricate(real_size=True)`: 500x375 JPEGs for ImageNet-style sets, ~95 KB
  each), read by the dataset's own loader with the suite's transforms and workers (at most one
  per core of this machine);
- for REHEARSAL_STEPS optimizer steps per phase (a phased method, GaP, one step per phase at
  least), validation passes inside fits left out;
- on a GPU at the suite's batch, in micro-batches of `--device-batch` (or the recipe's
  `device_batch`) with gradient accumulation where the batch does not fit at once; on a CPU at
  `--device-batch` (default CPU_DEVICE_BATCH) images a step, the step time scaled to the suite's
  batch (linear in the batch: compute-bound steps; stated in every row);
- latency at batch 1, two alternating blocks each (the timing protocol, not its precision).

Per stage (`RehearsalMeter`, one per setting) it writes: wall seconds, optimizer steps, the median
time between optimizer steps (the first step of a phase, which pays start-up, excluded), peak memory
(PSS) of the process and its loader workers, peak `/dev/shm` use, peak device memory on CUDA; per
(dataset, resolution) the loader's images/s; and device-hours projected from the measured steps
for every run of the real suite (all targets and seeds; the dense pretrain once per dense
checkpoint), with the step counts of the dry run (`SweepEta`): a run's steps cost what its
setting's steps cost at the rehearsed target (a structured method's steps get cheaper as its
model shrinks, so lower targets cost somewhat less than projected). Written to DIR/rehearsal.json and DIR/rehearsal.md
after every setting; the runs' own records, checkpoints and models go to a temporary folder and
are removed (their size is reported), so a rehearsal never enters a results store.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, TextIO

from sparsebench.runners.pipeline import PhaseTimes
from sparsebench.specs import RunSpec, stable_hash

REHEARSAL_STEPS = 3          # optimizer steps per phase: the first pays start-up, the others are timed
CPU_DEVICE_BATCH = 8         # images per step on a CPU; the step time is scaled to the suite's batch
REHEARSAL_VAL_FRACTION = 0.1
LOADER_BATCHES = 6           # batches the loader figure is timed over (after the first)
SAMPLE_INTERVAL = 0.1        # seconds between resource samples


# --------------------------------------------------------------------------- resources
def _process_tree(root: int) -> List[int]:
    """`root` and its descendants (the loader's worker processes), from /proc."""
    parents: Dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    parents[int(entry.name)] = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):     # a process that ended while we looked
                continue
    tree, frontier = [root], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        tree += children
        frontier += children
    return tree


def _pss(pid: int) -> int:
    """Proportional set size in bytes: pages shared with other processes (forked loader workers share
    the parent's torch import) counted once over all of them, where RSS would count them in each."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _shm_mappings(pid: int) -> Dict[str, int]:
    """{inode: bytes} of the /dev/shm files `pid` maps (DataLoader workers hand batches over in such files,
    unlinked once mapped: "/dev/shm/torch_... (deleted)")."""
    out: Dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                if "/dev/shm/" in line:
                    fields = line.split()
                    start, end = (int(v, 16) for v in fields[0].split("-"))
                    out[fields[4]] = max(out.get(fields[4], 0), end - start)
    except OSError:
        pass
    return out


def tree_usage(root: int) -> tuple:
    """(PSS bytes, /dev/shm bytes mapped) of `root` and its descendants; a shared-memory file mapped by
    several of them (a batch a worker wrote and the main process reads) counts once."""
    pss, shm = 0, {}
    for pid in _process_tree(root):
        pss += _pss(pid)
        shm.update(_shm_mappings(pid))
    return pss, sum(shm.values())


class ResourceSampler:
    """Peak memory (PSS) of this process tree and peak /dev/shm it maps, sampled on a thread; `reset`
    starts new peaks. Both are this process tree's own, whatever else runs on the machine."""

    def __init__(self, interval: float = SAMPLE_INTERVAL):
        self.interval = interval
        self.pid = os.getpid()
        self.peak_pss = 0
        self.peak_shm = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rehearsal-sampler", daemon=True)

    def __enter__(self) -> "ResourceSampler":
        self.reset()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def reset(self) -> None:
        with self._lock:
            self.peak_pss, self.peak_shm = 0, 0
        self.sample()

    def sample(self) -> None:
        pss, shm = tree_usage(self.pid)
        with self._lock:
            self.peak_pss = max(self.peak_pss, pss)
            self.peak_shm = max(self.peak_shm, shm)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()


# --------------------------------------------------------------------------- per stage
@dataclass
class StageFigures:
    seconds: float = 0.0
    steps: int = 0
    step_seconds: Optional[float] = None        # median between optimizer steps, first of the phase excluded
    peak_pss_mb: float = 0.0
    peak_shm_mb: float = 0.0
    peak_device_mb: Optional[float] = None      # CUDA only
    _intervals: List[float] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict:
        out = {k: v for k, v in dataclasses.asdict(self).items() if not k.startswith("_")}
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in out.items()}


class RehearsalMeter(PhaseTimes):
    """`PhaseTimes` that also measures each phase (StageFigures): the pipeline calls it as it calls
    any `times`, so the rehearsal measures the real stages without a second copy of them. Optimizer
    steps are seen through torch's global optimizer-step hook (every optimizer a method builds)."""

    def __init__(self, sampler: ResourceSampler, cuda: bool):
        super().__init__()
        self.sampler, self.cuda = sampler, cuda
        self.figures: Dict[str, StageFigures] = {}
        self._step_times: Optional[List[float]] = None

    def on_optimizer_step(self, *_args) -> None:
        if self._step_times is not None:
            if self.cuda:
                import torch

                torch.cuda.synchronize()      # the step's kernels, not just their launch
            self._step_times.append(time.perf_counter())

    @contextlib.contextmanager
    def __call__(self, phase: str):
        import torch

        outer = self._step_times
        steps: List[float] = []
        self._step_times = steps
        self.sampler.reset()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.sampler.sample()
            self._step_times = outer
            self[phase] = self.get(phase, 0.0) + seconds
            f = self.figures.setdefault(phase, StageFigures())
            f.seconds += seconds
            f.steps += len(steps)
            f._intervals += [b - a for a, b in zip(steps, steps[1:])]
            if f._intervals:
                f.step_seconds = statistics.median(f._intervals)
            f.peak_pss_mb = max(f.peak_pss_mb, self.sampler.peak_pss / 2**20)
            f.peak_shm_mb = max(f.peak_shm_mb, self.sampler.peak_shm / 2**20)
            if self.cuda:
                f.peak_device_mb = max(f.peak_device_mb or 0.0, torch.cuda.max_memory_allocated() / 2**20)


@contextlib.contextmanager
def optimizer_steps_seen_by(meter: RehearsalMeter):
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(meter.on_optimizer_step)
    try:
        yield
    finally:
        handle.remove()


# --------------------------------------------------------------------------- what is rehearsed
COVERS = ("datasets", "pairs")


def pair_label(spec: RunSpec) -> str:
    """A (method and arguments, model) pair at one resolution: what a step costs depends on these."""
    from sparsebench.runners.smoke import method_with_args

    return f"{method_with_args(spec)} {spec.model}@{spec.data.img_size or 'native'}"


def setting_label(spec: RunSpec) -> str:
    """One rehearsed setting: a (method and arguments, model, dataset); the suite's targets share it."""
    from sparsebench.runners.smoke import method_with_args

    return f"{method_with_args(spec)} {spec.model} {spec.dataset}"


def rehearsal_settings(specs: List[RunSpec], cover: str = "datasets") -> List[RunSpec]:
    """The suite runs a rehearsal runs, in the suite's order: the first target and seed of every
    (method and arguments, model, dataset) (`cover="datasets"`); or of every (method and arguments,
    model) pair with a model's datasets handed out in turn so each is read at least once (`"pairs"`,
    for suites whose datasets share a resolution: a step costs the same on each, their loaders differ)."""
    if cover not in COVERS:
        raise ValueError(f"cover={cover!r}; allowed: {', '.join(COVERS)}")
    firsts: Dict[str, RunSpec] = {}
    for s in specs:
        firsts.setdefault(setting_label(s), s)
    if cover == "datasets":
        return list(firsts.values())
    datasets: Dict[str, List[str]] = {}
    for s in firsts.values():
        datasets.setdefault(s.model, [])
        if s.dataset not in datasets[s.model]:
            datasets[s.model].append(s.dataset)
    chosen: Dict[str, RunSpec] = {}
    turn: Dict[str, int] = {}
    for s in firsts.values():                              # every pair once, datasets in turn
        pair = pair_label(s)
        if pair in chosen:
            continue
        wanted = datasets[s.model][turn.get(s.model, 0) % len(datasets[s.model])]
        candidate = firsts.get(setting_label(dataclasses.replace(s, dataset=wanted)), s)
        chosen[pair] = candidate
        turn[s.model] = turn.get(s.model, 0) + 1
    picked = list(chosen.values())
    for model, names in datasets.items():                  # a dataset no pair drew: read once more
        for name in names:
            if not any(p.model == model and p.dataset == name for p in picked):
                picked.append(next(s for s in firsts.values() if s.model == model and s.dataset == name))
    return picked


# --------------------------------------------------------------------------- the rehearsal spec
def device_batch_of(spec: RunSpec, device_batch: Optional[int], cuda: bool) -> tuple:
    """(images per optimizer step, images per micro-batch or None) in the rehearsal. On a GPU the
    suite's own batch, in micro-batches of `device_batch` (else the recipe's `device_batch`) with
    gradient accumulation, as the real run takes it; on a CPU a batch of `device_batch` (default
    CPU_DEVICE_BATCH) or the suite's if smaller, its step time scaled to the suite's batch."""
    if cuda:
        return spec.recipe.batch_size, device_batch or spec.recipe.device_batch
    return min(spec.recipe.batch_size, device_batch or CPU_DEVICE_BATCH), None


def rehearsal_spec(spec: RunSpec, steps_per_epoch: int, batch: int, workers: int, cuda: bool,
                   micro_batch: Optional[int] = None) -> RunSpec:
    """The real-size, few-step version of a suite run (module docstring)."""
    from sparsebench.runners.smoke import minimum_steps

    steps = max(REHEARSAL_STEPS, minimum_steps(spec))
    r = spec.recipe

    def epochs(value: float, wanted: int) -> float:
        return 0.0 if value == 0 else wanted / steps_per_epoch

    # bf16 autocast is a GPU setting: on a CPU it runs emulated, far slower than the fp32 a CPU would use;
    # torch.compile is left out (minutes of compiling for three steps)
    precision = r.precision if cuda else "fp32"
    recipe = dataclasses.replace(r, batch_size=batch, precision=precision, device_batch=micro_batch, compile=False,
                                 pretrain_epochs=epochs(r.pretrain_epochs, steps),
                                 finetune_epochs=epochs(r.finetune_epochs, REHEARSAL_STEPS),
                                 search_epochs=epochs(r.search_epochs, REHEARSAL_STEPS),
                                 evals_per_epoch=1e-3)
    data = dataclasses.replace(spec.data, val_fraction=REHEARSAL_VAL_FRACTION, workers=workers)
    measure = dataclasses.replace(spec.measure, latency=True, batch_sizes=(1,), rounds=2, min_run_time=0.05,
                                  compile=False)
    return dataclasses.replace(spec, recipe=recipe, data=data, measure=measure, pretrained=None)


def images_needed(batch: int, classes: int) -> int:
    """Training images per class for LOADER_BATCHES + 1 batches after the validation carve-out."""
    return math.ceil(batch * (LOADER_BATCHES + 2) / (1 - REHEARSAL_VAL_FRACTION) / classes) + 1


# --------------------------------------------------------------------------- loader throughput
def loader_figures(dataset: str, data_root: Path, img_size: Optional[int], batch: int, workers: int,
                   sampler: ResourceSampler, suite_batch: int, suite_workers: int) -> dict:
    """Images/s of the dataset's own training loader (decode, augment, collate) at `workers`, timed over
    LOADER_BATCHES batches after the first (which pays the workers' start); the bytes of one batch; and
    the shared memory the suite's own loaders (its batch and workers) would keep in flight on this
    machine's /dev/shm (`loaders.prefetch_plan`: the prefetch factor it allows, or why none fits)."""
    from sparsebench.errors import SpecError
    from sparsebench.runners.loaders import prefetch_plan
    from sparsebench.training.loading import EVAL_BATCH

    import torch
    from torch.utils.data import DataLoader

    from sparsebench.datasets import create_dataset

    data = create_dataset(dataset, str(data_root), img_size, REHEARSAL_VAL_FRACTION, 0)
    loader = DataLoader(data.train, batch_size=batch, shuffle=True, drop_last=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(0))
    sampler.reset()
    it = iter(loader)
    first = next(it)
    start, images = time.perf_counter(), 0
    for _ in range(LOADER_BATCHES):
        try:
            x, _y = next(it)
        except StopIteration:
            break
        images += len(x)
    seconds = time.perf_counter() - start
    sampler.sample()
    del it
    x = first[0]
    try:
        plan = prefetch_plan(data.train, suite_batch, EVAL_BATCH, suite_workers)
        suite = {"suite_prefetch_factor": plan.prefetch_factor,
                 "suite_shm_in_flight_mb": round(plan.prefetch_bytes / 2**20, 1),
                 "shm_size_mb": None if plan.shm_bytes is None else round(plan.shm_bytes / 2**20)}
    except SpecError as e:
        suite = {"suite_prefetch_factor": 0, "suite_shm_error": str(e)}
    return {"dataset": dataset, "img_size": data.info.img_size, "batch": batch, "workers": workers,
            "suite_batch": suite_batch, "suite_workers": suite_workers, **suite,
            "images_per_s": round(images / max(seconds, 1e-9), 1),
            "batch_mb": round(x.numel() * x.element_size() / 2**20, 2), "batch_dtype": str(x.dtype).replace("torch.", ""),
            "peak_shm_mb": round(sampler.peak_shm / 2**20, 1)}


def projected_shm_mb(batch_mb_at_rehearsal: float, rehearsal_batch: int, suite_batch: int, workers: int,
                     prefetch_factor: int = 2) -> float:
    """Shared memory a suite's training loader holds: each worker keeps `prefetch_factor` batches."""
    return batch_mb_at_rehearsal * suite_batch / rehearsal_batch * workers * prefetch_factor


# --------------------------------------------------------------------------- projection
TRAINING = {"pretrain": "dense checkpoint", "method": "method", "finetune": "finetune"}


def project(specs: List[RunSpec], settings: Dict[str, dict]) -> dict:
    """Device-hours of every run of the real suite from the rehearsal's scaled step times; step counts
    as in the dry run (`SweepEta.plan`); each dense checkpoint's pretrain counted once."""
    from sparsebench.runners.progress import SweepEta

    from sparsebench.runners.pipeline import resolve

    eta = SweepEta.plan([resolve(s) for s in specs])     # plans in the order of `specs`, labelled as the suite has them
    pretrain_seconds: Dict[str, float] = {}      # dense family -> scaled seconds per pretrain step
    for s in settings.values():
        if s.get("pretrain_step_seconds") is not None:
            pretrain_seconds.setdefault(s["dense_family"], s["pretrain_step_seconds"])
    seconds, per_method, missing = 0.0, {}, set()
    counted = set()
    by_pair: Dict[str, dict] = {}
    for s in settings.values():
        if s.get("status") != "error":
            by_pair.setdefault(s["pair"], s)
    for spec, plan in zip(specs, eta.plans):
        label = setting_label(spec)
        s = settings.get(label) or by_pair.get(pair_label(spec))     # same pair, another dataset: same step
        if s is None or s.get("status") == "error":
            missing.add(label)
            continue
        run = 0.0
        for phase in ("method", "finetune"):
            per = s["scaled_step_seconds"].get(phase)
            if per is not None:
                run += plan.steps[phase] * per
            elif phase in s.get("one_off_seconds", {}):       # a one-shot method: no optimizer steps at all
                run += s["one_off_seconds"][phase]
            elif plan.steps[phase]:
                missing.add(f"{label} ({phase})")
        if plan.dense_key not in counted and plan.steps["pretrain"]:    # a suite that trains no dense model has none
            counted.add(plan.dense_key)
            per = pretrain_seconds.get(dense_family(spec))
            if per is None:
                missing.add(f"{label} (pretrain)")
            else:
                run += plan.steps["pretrain"] * per
        seconds += run
        label = s["method"]
        per_method[label] = per_method.get(label, 0.0) + run / 3600
    return {"device_hours": round(seconds / 3600, 2), "runs": len(eta.plans),
            "per_method_hours": {k: round(v, 2) for k, v in sorted(per_method.items(), key=lambda kv: -kv[1])},
            "not_projected": sorted(missing),
            "basis": "optimizer steps of the real suite (dry-run counts) x the rehearsal's median seconds between "
                     "optimizer steps of the same (method, model) at its first target, scaled linearly from the "
                     "rehearsal batch to the suite's; training steps only (validation passes and latency timing "
                     "extra)"}


def dense_family(spec: RunSpec) -> str:
    """The dense checkpoints that differ only by seed: one pretrain step time serves them all."""
    from sparsebench.runners.pipeline import resolve

    return stable_hash(dataclasses.replace(resolve(spec), seed=0).dense_key())


# --------------------------------------------------------------------------- the rehearsal
@dataclass
class RehearsalResult:
    entry: str
    status: str
    seconds: float
    error: str = ""


def run_rehearsal(suite, out: Path, device: str = "cpu", device_batch: Optional[int] = None,
                  cover: str = "datasets", say=print) -> dict:
    """Rehearse every setting of `suite` (module docstring); returns and writes the figures."""
    import torch

    from sparsebench.datasets.replicas import REPLICA_CLASSES, fabricate
    from sparsebench.datasets import create_dataset
    from sparsebench.measure.environment import environment
    from sparsebench.store.record import device_label
    from sparsebench.runners.pipeline import RunOptions, execute, resolve, validate
    from sparsebench.runners.cost import method_label
    from sparsebench.runners.smoke import check_suite, partial_data_allowed

    check_suite(suite)
    cuda = torch.device(device).type == "cuda"

    def finish(report: dict, start: float) -> None:
        """Projection and wall time (an earlier run's included) brought up to date, and both files written."""
        report["projection"] = project(suite.specs, report["settings"])
        report["wall_seconds"] = round(earlier.get("wall_seconds", 0.0) + time.perf_counter() - start, 1)
        write_report(out, report)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    todo = rehearsal_settings(suite.specs, cover)
    cores = os.cpu_count() or 1
    env = environment(torch.device(device), torch.get_num_threads())
    earlier = _earlier_report(out, suite.name, device, cover)
    report = {"suite": suite.name, "device": device, "cover": cover,
              "machine": f"{device_label(env)}, {env['cpu_count']} CPU cores, torch {env['torch']}",
              "rehearsal_steps_per_phase": REHEARSAL_STEPS, "settings": {}, "loaders": dict(earlier.get("loaders", {}))}
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rehearsal-", dir=out)))
        data_root = work / "data"
        stack.enter_context(partial_data_allowed())
        sampler = stack.enter_context(ResourceSampler())
        options = RunOptions(out=work / "runs", data_root=str(data_root), device=device, resume=False,
                             checkpoint_every=None, save_model=True)
        fabricated, per_epoch = set(), {}
        start = time.perf_counter()
        for i, spec in enumerate(todo):
            label = setting_label(spec)
            done = earlier.get("settings", {}).get(label)
            if done is not None and done.get("status") != "error":     # rehearsed before: kept, not re-run
                report["settings"][label] = done
                continue
            t = time.perf_counter()
            entry = {"method": method_label(spec), "model": spec.model, "dataset": spec.dataset,
                     "target": str(spec.target), "pair": pair_label(spec), "suite_batch": spec.recipe.batch_size,
                     "suite_workers": spec.data.workers, "suite_precision": spec.recipe.precision}
            try:
                batch, micro_batch = device_batch_of(spec, device_batch, cuda)
                workers = min(spec.data.workers, cores)
                if spec.dataset not in fabricated:
                    fabricate(spec.dataset, data_root, images_needed(batch, REPLICA_CLASSES[spec.dataset]), real_size=True)
                    fabricated.add(spec.dataset)
                key = (spec.dataset, spec.data.img_size, batch)
                if key not in per_epoch:
                    data = create_dataset(spec.dataset, str(data_root), spec.data.img_size, REHEARSAL_VAL_FRACTION, 0)
                    per_epoch[key] = max(1, data.split["n_train"] // batch)
                    loader_key = f"{spec.dataset}@{data.info.img_size}"
                    if loader_key not in report["loaders"]:
                        report["loaders"][loader_key] = loader_figures(spec.dataset, data_root, spec.data.img_size,
                                                                       batch, workers, sampler, spec.recipe.batch_size,
                                                                       spec.data.workers)
                real = resolve(spec)
                small = resolve(rehearsal_spec(spec, per_epoch[key], batch, workers, cuda, micro_batch))
                validate(small)
                meter = RehearsalMeter(sampler, cuda)
                with optimizer_steps_seen_by(meter):
                    record = execute(small, options, meter)
                entry.update(_entry_figures(real, small, record, meter, batch, workers, options))
                entry["status"] = record.status
                if record.error:
                    entry["error"] = record.error
            except Exception as e:  # noqa: BLE001 -- every failure is reported, the others still run
                message = (str(e).splitlines() or [type(e).__name__])[0]
                entry.update(status="error", error=f"{type(e).__name__}: {message}")
                say(f"REHEARSAL FAILED {label}: {entry['error']}")
            entry["seconds"] = round(time.perf_counter() - t, 1)
            entry["pss_after_mb"] = round(settle_memory(sampler) / 2**20)
            report["settings"][label] = entry
            finish(report, start)
            say(f"[rehearse {suite.name}] {i + 1}/{len(todo)} {label}: {entry['status']} in {entry['seconds']:.0f} s")
        finish(report, start)       # also when every setting was kept from before
    return report


def settle_memory(sampler: ResourceSampler) -> int:
    """Between settings, memory a setting freed is handed back (`platform.release_memory`), so each
    setting's peaks are its own and not a heap an earlier one grew; returns the PSS left, which the report
    keeps (`pss_after_mb`): memory still held here was not freed by the run."""
    from sparsebench.platform import release_memory

    release_memory()
    sampler.reset()
    return sampler.peak_pss


def _earlier_report(out: Path, suite: str, device: str, cover: str) -> dict:
    """A rehearsal of the same suite on the same device kind already in `out` (an interrupted one, or one
    with failed settings): its finished settings are kept and only the rest run."""
    try:
        report = json.loads((out / "rehearsal.json").read_text())
    except (OSError, ValueError):
        return {}
    same = (report.get("suite"), str(report.get("device", "")).split(":")[0], report.get("cover", "datasets")) == \
        (suite, device.split(":")[0], cover)
    return report if same else {}


def _entry_figures(real: RunSpec, small: RunSpec, record, meter: RehearsalMeter, batch: int, workers: int,
                   options) -> dict:
    scale = real.recipe.batch_size / batch
    stages = {phase: f.as_dict() for phase, f in meter.figures.items()}
    scaled, one_off = {}, {}
    for phase, stage in TRAINING.items():
        f = meter.figures.get(stage)
        if f is not None and f.step_seconds is not None:
            scaled[phase] = round(f.step_seconds * scale, 4)
        elif f is not None and f.steps == 0 and phase != "pretrain":
            one_off[phase] = round(f.seconds, 4)     # e.g. a one-shot pruning method: its stage, once per run
    artifact = (record.artifact or {}) if hasattr(record, "artifact") else {}
    model_file = artifact.get("path")
    size = None
    if model_file:
        path = Path(options.out) / model_file
        size = round(path.stat().st_size / 2**20, 1) if path.exists() else None
        path.unlink(missing_ok=True)          # measured: a paper suite's models would fill gigabytes
    return {"rehearsal_batch": batch, "rehearsal_micro_batch": small.recipe.device_batch,
            "rehearsal_workers": workers, "batch_scale": round(scale, 3),
            "rehearsal_precision": small.recipe.precision,
            "dense_family": dense_family(real),
            "pretrain_step_seconds": scaled.get("pretrain"),
            "scaled_step_seconds": {k: v for k, v in scaled.items() if k != "pretrain"}, "one_off_seconds": one_off,
            "stages": stages, "saved_model_mb": size}


# --------------------------------------------------------------------------- output
def write_report(out: Path, report: dict) -> None:
    """rehearsal.json and rehearsal.md, each replaced whole (a reader never sees half a file)."""
    for name, text in (("rehearsal.json", json.dumps(report, indent=1, sort_keys=False) + "\n"),
                       ("rehearsal.md", markdown(report))):
        tmp = out / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, out / name)


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown(report: dict) -> str:
    lines = [f"# Rehearsal of `{report['suite']}` on {report['device']}", "",
             f"Machine: {report['machine']}. {report['rehearsal_steps_per_phase']} optimizer steps per phase at the "
             "real model and resolution on fabricated data at real image sizes; step times are medians between "
             "optimizer steps at the rehearsal batch, scaled to the suite's batch (`scaled s/step`). "
             "Peak PSS counts the process and its loader workers, shared pages once; peak shm is the /dev/shm files they map.", "",
             "| setting | status | batch (suite) | stage | s | steps | s/step | scaled s/step | peak PSS MB | "
             "peak shm MB | peak device MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, e in report["settings"].items():
        stages = e.get("stages") or {}
        shown = [p for p in ("data", "dense checkpoint", "method", "finetune", "evaluation", "latency", "record")
                 if p in stages] or [None]
        for j, phase in enumerate(shown):
            f = stages.get(phase, {}) if phase else {}
            scaled = None
            if phase in TRAINING.values() and f.get("step_seconds") is not None:
                scaled = f["step_seconds"] * e.get("batch_scale", 1.0)
            head = (f"`{label}`", e["status"], f"{e.get('rehearsal_batch', '–')} ({e['suite_batch']})") if j == 0 \
                else ("", "", "")
            lines.append("| " + " | ".join([*head, phase or "–", _fmt(f.get("seconds"), 1), _fmt(f.get("steps")),
                                             _fmt(f.get("step_seconds"), 3), _fmt(scaled, 2),
                                             _fmt(f.get("peak_pss_mb"), 0), _fmt(f.get("peak_shm_mb"), 0),
                                             _fmt(f.get("peak_device_mb"), 0)]) + " |")
    lines += ["", "| loader | batch | workers | images/s | batch MB | peak shm MB | suite: batch, workers, prefetch, "
                  "shm in flight MB (of /dev/shm) |", "|---|---|---|---|---|---|---|"]
    for key, f in report["loaders"].items():
        suite = f"{f['suite_batch']}, {f['suite_workers']}, " + (
            f"{f['suite_prefetch_factor']}, {f['suite_shm_in_flight_mb']} (of {f.get('shm_size_mb') or '–'})"
            if f.get("suite_prefetch_factor") else f"does not fit: {f.get('suite_shm_error', '')}")
        lines.append(f"| {key} | {f['batch']} | {f['workers']} | {f['images_per_s']} | {f['batch_mb']} "
                     f"({f['batch_dtype']}) | {f['peak_shm_mb']} | {suite} |")
    p = report.get("projection") or {}
    if p:
        lines += ["", f"**Projected: {p['device_hours']:,} device-hours** for the suite's {p['runs']} runs on this "
                      f"device ({p['basis']}).", "", "| method | device-hours |", "|---|---|"]
        lines += [f"| `{m}` | {h:,} |" for m, h in p["per_method_hours"].items()]
        if p["not_projected"]:
            lines += ["", "Not projected (no measured steps): " + ", ".join(f"`{m}`" for m in p["not_projected"])]
    failed = [k for k, e in report["settings"].items() if e["status"] == "error"]
    lines += ["", f"{len(report['settings'])} settings rehearsed in {report.get('wall_seconds', 0):.0f} s; "
                  f"{len(failed)} failed."]
    return "\n".join(lines) + "\n"


def rehearse(suite, out: Path, device: str = "cpu", device_batch: Optional[int] = None,
             cover: str = "datasets", stream: Optional[TextIO] = None) -> int:
    """The CLI's `--rehearse`: exit 1 if any setting failed."""
    stream = stream or sys.stdout

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    report = run_rehearsal(suite, out, device, device_batch, cover, say)
    failed = sum(e["status"] == "error" for e in report["settings"].values())
    p = report["projection"]
    say(f"rehearsal {suite.name}: {len(report['settings'])} settings in {report['wall_seconds']:.0f} s, {failed} failed; "
        f"projected {p['device_hours']:,} device-hours on {device}; figures in {Path(out) / 'rehearsal.md'}")
    return 1 if failed else 0


__all__ = ["CPU_DEVICE_BATCH", "REHEARSAL_STEPS", "RehearsalMeter", "ResourceSampler", "rehearse",
           "rehearsal_spec", "run_rehearsal"]

"""Watching a run while it trains: live curves in TensorBoard (and MLflow), resource use, progress.

A `RunWatch` is current for the length of one run (`use_watch`, entered by the pipeline on rank 0
only). Every `Trainer` built meanwhile attaches to it: its `TrainingCurve` then also writes each
point it keeps to the stage's `StageLog` (loss, lr, validation top-1, the method's events and
values, as they happen), and each optimizer step reports its images and how long it waited for
its batch (`after_step`). Every `flush_every` seconds the watch adds the throughput, the loader
wait fraction, each masked layer's density (only after the masks changed) and the latest resource
sample to the same stage, and flushes. A `ResourceSampler` thread samples the machine every
`sample_every` seconds; a sample belongs to the stage that stepped since the previous one, and
`resources()` gives the record's per-stage summary.

Trackers: `TensorBoardTracker` writes event files under OUT/tb/<run_id>/<stage>/ (one
TensorBoard run per stage; a stage's step axis is its curve's); `MlflowTracker` logs the same
scalars as `<stage>/<tag>` metrics to an MLflow run tagged with the run id, the spec as params,
and the record, model and report as artifacts.

Resumed runs continue the same curves: a curve loaded from a checkpoint tells its log the last
step it holds (`StageLog.resumed`); points up to it were written before the interruption and are
not written again, and the first new point reopens the stage with TensorBoard's `purge_step`, so
the points written after the checkpoint and before the kill are dropped by TensorBoard's reader
instead of shown twice. (MLflow cannot drop points: a resumed MLflow run may hold those steps twice.)
"""
from __future__ import annotations

import contextlib
import json
import math
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import torch

from sparsebench.measure.resources import SAMPLED, ResourceSampler, StageResources, source_name

FLUSH_SECONDS = 5.0             # between flushes of the trackers and the interval's throughput and densities
SAMPLE_SECONDS = 2.0            # between resource samples
TRACKERS = ("tensorboard", "mlflow", "none")


class Tracker:
    """Where a run's scalars go. `open_stage` comes before a stage's first scalar, with the first step
    this process writes (everything from it on is written again now)."""

    name = "tracker"

    def open_stage(self, stage: str, purge_step: int) -> None:
        pass

    def scalars(self, stage: str, step: int, values: Dict[str, float]) -> None:
        raise NotImplementedError

    def flush(self) -> None:
        pass

    def artifacts(self, paths: List[Path]) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files under `directory/<stage>/`, written by torch's `SummaryWriter`. A step's scalars are one
    event, kept here until `flush` (every `flush_every` seconds, and at checkpoints) hands them all to the
    writer's thread at once: handing each step's event over as it came woke that thread every step, and
    its turns at the interpreter cost the training thread ~5 % of a small model's step."""

    name = "tensorboard"

    def __init__(self, directory: Path, flush_every: float = FLUSH_SECONDS):
        from tensorboard.compat.proto.summary_pb2 import Summary   # ImportError without the tensorboard package
        from torch.utils.tensorboard import SummaryWriter

        self._writer_class, self._summary = SummaryWriter, Summary
        self.directory, self.flush_every = Path(directory), flush_every
        self.writers: Dict[str, Any] = {}
        self._pending: List[tuple] = []      # (stage, step, values) not yet handed to the writer

    def open_stage(self, stage: str, purge_step: int) -> None:
        self.flush()
        if stage in self.writers:
            self.writers[stage].close()
        # the writer's own thread writes what it is given within flush_secs; `flush` forces it
        self.writers[stage] = self._writer_class(log_dir=str(self.directory / stage), purge_step=purge_step,
                                                 flush_secs=max(1, int(self.flush_every)))

    def scalars(self, stage: str, step: int, values: Dict[str, float]) -> None:
        self._pending.append((stage, step, values))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for stage, step, values in pending:
            summary = self._summary(value=[self._summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
            self.writers[stage]._get_file_writer().add_summary(summary, step)
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        self.flush()
        for writer in self.writers.values():
            writer.close()
        self.writers = {}


class MlflowTracker(Tracker):
    """One MLflow run per sparsebench run (tagged `sparsebench.run_id`; a resumed run finds and continues
    it): the spec as params, every scalar as metric `<stage>/<tag>` (sent in batches at each flush), and
    artifacts. `uri` None: a SQLite store in the results directory (OUT/mlflow.db); a local store's
    artifacts go to OUT/mlflow-artifacts."""

    name = "mlflow"
    EXPERIMENT = "sparsebench"
    BATCH = 1000        # MLflow's most metrics per log_batch

    def __init__(self, out: Path, run_id: str, params: Dict[str, Any], uri: Optional[str] = None):
        from mlflow.tracking import MlflowClient        # ImportError without the mlflow extra

        out = Path(out).resolve()
        self.uri = uri or f"sqlite:///{out / 'mlflow.db'}"
        self.client = MlflowClient(self.uri)
        experiment = self.client.get_experiment_by_name(self.EXPERIMENT)
        if experiment is None:
            # a local store keeps its artifacts in the results directory (MLflow's default is ./mlruns in the
            # working directory); a tracking server decides where its own go
            local = self.uri.split(":", 1)[0] in ("sqlite", "file") or "://" not in self.uri
            experiment_id = self.client.create_experiment(
                self.EXPERIMENT, artifact_location=(out / "mlflow-artifacts").as_uri() if local else None)
        else:
            experiment_id = experiment.experiment_id
        found = self.client.search_runs([experiment_id], f"tags.`sparsebench.run_id` = '{run_id}'", max_results=1)
        if found:
            self.mlflow_run_id = found[0].info.run_id
            self.client.update_run(self.mlflow_run_id, status="RUNNING")
        else:
            self.mlflow_run_id = self.client.create_run(
                experiment_id, run_name=run_id, tags={"sparsebench.run_id": run_id}).info.run_id
            from mlflow.entities import Param

            # MLflow keeps a param's value to 6000 characters; a spec's values are far shorter
            batch = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
            for i in range(0, len(batch), 100):
                self.client.log_batch(self.mlflow_run_id, params=batch[i:i + 100])
        self._pending: list = []

    def scalars(self, stage: str, step: int, values: Dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._pending += [Metric(_mlflow_key(f"{stage}/{tag}"), float(v), now, int(step)) for tag, v in values.items()]

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for i in range(0, len(pending), self.BATCH):
            self.client.log_batch(self.mlflow_run_id, metrics=pending[i:i + self.BATCH])

    def artifacts(self, paths: List[Path]) -> None:
        """Files as artifacts by their names; a folder (a report) as a folder of that name."""
        for path in map(Path, paths):
            if path.is_file():
                self.client.log_artifact(self.mlflow_run_id, str(path))
            elif path.is_dir():
                self.client.log_artifacts(self.mlflow_run_id, str(path), artifact_path=path.name)

    def close(self) -> None:
        self.flush()
        self.client.set_terminated(self.mlflow_run_id)


def _mlflow_key(tag: str) -> str:
    """MLflow metric names allow letters, digits and _-./ and spaces; anything else becomes '_'."""
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in tag)


def flat_params(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """A nested spec as flat `a.b.c` params."""
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flat_params(v, key + "."))
        else:
            out[key] = v
    return out


class StageLog:
    """What one stage's curve writes to the trackers; see the module docstring for resumes.

    Points wait here until the stage's first optimizer step in this process (`start`): a resumed
    stage replays what its method did before its first fit (an initial prune, the events between
    completed fits) before the fits load their checkpoints, and only then is it known which of
    those points were written before the interruption."""

    def __init__(self, watch: "RunWatch", stage: str):
        self.watch, self.stage = watch, stage
        self.written_through = -1      # steps up to this one were written before a resume
        self.started = self.opened = False
        self.pending: List[tuple] = []
        self.last_val: Optional[float] = None     # the stage's latest validation top-1, for progress lines

    def resumed(self, last_step: int) -> None:
        self.written_through = max(self.written_through, int(last_step))

    def write(self, step: int, values: Dict[str, float]) -> None:
        if not self.watch.trackers:
            return
        if not self.started:
            self.pending.append((step, values))
            return
        self._write(step, values)

    def start(self) -> None:
        """The stage steps: every checkpoint it resumes from is loaded; the points held back go out."""
        if self.started:
            return
        self.started = True
        pending, self.pending = self.pending, []
        for step, values in pending:
            self._write(step, values)

    def _write(self, step: int, values: Dict[str, float]) -> None:
        if step <= self.written_through:
            return
        if not self.opened:         # everything from here on is written (again) by this process
            self.watch.each_tracker("open_stage", self.stage, step)
            self.opened = True
        finite = {tag: float(v) for tag, v in values.items() if v is not None and math.isfinite(v)}
        self.watch.each_tracker("scalars", self.stage, step, finite)

    # what a TrainingCurve hands on
    def step(self, step: int, loss: float, lr: float) -> None:
        self.write(step, {"train/loss": loss, "train/lr": lr})

    def val(self, step: int, top1: float) -> None:
        self.write(step, {"val/top1": top1})
        self.last_val = top1

    def event(self, step: int, kind: str, numbers: Dict[str, Any]) -> None:
        values = {f"events/{kind}/{k}": v for k, v in numbers.items()
                  if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.write(step, values or {f"events/{kind}": 1.0})

    def value(self, name: str, step: int, value: float) -> None:
        self.write(step, {f"values/{name}": value})


class RunWatch:
    """One run's live logging, resource sampling and progress lines (module docstring).
    `progress_every`: seconds between plain progress lines on stderr (None: none)."""

    def __init__(self, trackers: List[Tracker], device: torch.device, sample_every: Optional[float] = None,
                 flush_every: Optional[float] = None, progress_every: Optional[float] = None, stream=None,
                 status_path: Optional[Path] = None, label: str = ""):
        sample_every = SAMPLE_SECONDS if sample_every is None else sample_every
        flush_every = FLUSH_SECONDS if flush_every is None else flush_every
        self.trackers, self.device = list(trackers), torch.device(device)
        self.flush_every, self.progress_every = flush_every, progress_every
        self.stream = stream if stream is not None else sys.stderr
        # where a sweep reads this run's progress (`running_runs`), rewritten at every flush interval
        self.status_path, self.label = (Path(status_path) if status_path else None), label
        self.logs: Dict[str, StageLog] = {}
        self.stages: Dict[str, StageResources] = {}
        self._stepping: Optional[str] = None       # the stage of the latest step
        self._stepped_at = -math.inf
        self._lock = threading.Lock()
        self._interval = {"start": time.monotonic(), "steps": 0, "images": 0, "data": 0.0, "step": 0.0}
        self._next_flush = time.monotonic() + flush_every
        self._next_line: Optional[float] = None       # the first line comes an interval after the first step
        self._mask_versions: Dict[int, int] = {}
        self._latest: Optional[dict] = None
        self._previous_sample = time.monotonic()
        self.sampler = ResourceSampler(self._on_sample, self.device, sample_every).start() if sample_every else None
        self.sampler_source = source_name()

    def each_tracker(self, name: str, *args) -> None:
        """Call every tracker's `name`; one that fails (a full disk, a tracking server gone) is dropped
        with a one-line note: live logging is never the reason a run fails."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, name)(*args)
            except Exception as e:  # noqa: BLE001
                self.trackers.remove(tracker)
                print(f"sparsebench: note: {tracker.name} logging stopped ({type(e).__name__}: {e}); "
                      f"the run goes on", file=self.stream)

    # --- trainers ---------------------------------------------------------------------------
    def attach(self, trainer) -> None:
        """A trainer's curve writes through its stage's log from now on (trainers of one stage share it)."""
        trainer.curve.log = self.log(trainer.stage)

    def log(self, stage: str) -> StageLog:
        if stage not in self.logs:
            self.logs[stage] = StageLog(self, stage)
        return self.logs[stage]

    def after_step(self, trainer, images: int, data_seconds: float, step_seconds: float) -> None:
        """Called by the trainer after every optimizer step; cheap unless an interval is due."""
        stage = trainer.stage
        self.log(stage).start()
        if stage != self._stepping:      # a new stage's throughput is its own steps' (not the last stage's tail)
            self._interval = {"start": time.monotonic() - step_seconds, "steps": 0, "images": 0, "data": 0.0,
                              "step": 0.0}
        with self._lock:
            resources = self.stages.get(stage)
            if resources is None:
                resources = self.stages[stage] = StageResources()
            resources.steps += 1
            resources.data_wait_seconds += data_seconds
            resources.wall_seconds += step_seconds
            self._stepping, self._stepped_at = stage, time.monotonic()
        interval = self._interval
        interval["steps"] += 1
        interval["images"] += images
        interval["data"] += data_seconds
        interval["step"] += step_seconds
        now = self._stepped_at
        if now >= self._next_flush:
            self._flush_interval(trainer, now)
        if self.progress_every is not None:
            if self._next_line is None:
                self._next_line = now + self.progress_every
            elif now >= self._next_line:
                self._next_line = now + self.progress_every
                print(progress_line(trainer, resources.wall_seconds / resources.steps, self.log(stage).last_val),
                      file=self.stream, flush=True)

    def _flush_interval(self, trainer, now: float) -> None:
        interval, seconds = self._interval, now - self._interval["start"]
        values = {"train/steps_per_second": interval["steps"] / seconds,
                  "train/images_per_second": interval["images"] / seconds,
                  "train/loader_wait_fraction": interval["data"] / interval["step"] if interval["step"] else None}
        values.update(self._densities(trainer))
        if self._latest is not None:
            values.update({f"resources/{k}": self._latest.get(k) for k in SAMPLED if k in self._latest})
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
            self.stages[trainer.stage].peak_allocated_mb = peak
            values["resources/gpu_peak_allocated_mb"] = peak
        self.log(trainer.stage).write(trainer.position, values)
        self.each_tracker("flush")
        if self.status_path is not None:
            resources = self.stages[trainer.stage]
            try:
                write_status(self.status_path, self.label, trainer, resources.wall_seconds / max(1, resources.steps),
                             self.log(trainer.stage).last_val)
            except OSError as e:        # a full or read-only disk: the sweep's lines go without this run
                print(f"sparsebench: note: progress not kept for the sweep ({e})", file=self.stream)
                self.status_path = None
        self._interval = {"start": now, "steps": 0, "images": 0, "data": 0.0, "step": 0.0}
        self._next_flush = now + self.flush_every

    def _densities(self, trainer) -> Dict[str, float]:
        """Each masked layer's density, once after every change of a hook's masks (one device read)."""
        out = {}
        for hook in trainer.hooks:
            masks = getattr(hook, "masks", None)
            if not isinstance(masks, dict) or not masks or self._mask_versions.get(id(hook)) == hook.version:
                continue
            self._mask_versions[id(hook)] = hook.version
            names = sorted(masks)
            kept = torch.stack([masks[n].sum() for n in names]).tolist()
            sizes = [masks[n].numel() for n in names]
            out.update({f"density/{n}": k / s for n, k, s in zip(names, kept, sizes)})
            out["density/all"] = sum(kept) / sum(sizes)
        return out

    # --- resources --------------------------------------------------------------------------
    def _on_sample(self, sample: dict) -> None:
        """(The sampler's thread.) A sample is the stepping stage's if it stepped since the previous one."""
        with self._lock:
            self._latest = sample
            if self._stepping is not None and self._stepped_at >= self._previous_sample:
                self.stages[self._stepping].add(sample)
            self._previous_sample = sample["time"]

    def resources(self) -> Optional[dict]:
        """The record's `resources`: per stage that trained in this process, and how it was sampled."""
        if not self.stages:
            return None
        if self.device.type == "cuda" and self._stepping is not None:
            self.stages[self._stepping].peak_allocated_mb = torch.cuda.max_memory_allocated(self.device) / 2 ** 20
        with self._lock:
            stages = {stage: r.as_dict() for stage, r in self.stages.items()}
        gpu = self.sampler.gpu.source if self.sampler is not None and self.sampler.gpu is not None else None
        return {"stages": stages, "sample_seconds": self.sampler.every if self.sampler is not None else None,
                "source": self.sampler_source, "gpu_source": gpu}

    def flush(self) -> None:
        """Everything written so far to disk (the trainer calls this as it saves a checkpoint: a resumed
        run skips the points up to its checkpoint, which must then be in the event files)."""
        self.each_tracker("flush")

    # --- the end ----------------------------------------------------------------------------
    def artifacts(self, paths: List[Path]) -> None:
        self.each_tracker("artifacts", [Path(p) for p in paths if p is not None])

    def close(self) -> None:
        if self.sampler is not None:
            self.sampler.stop()
        for log in self.logs.values():
            log.start()          # a stage that took no step here: what it replayed was written before
        self.each_tracker("close")
        if self.status_path is not None:
            with contextlib.suppress(OSError):
                self.status_path.unlink(missing_ok=True)      # the run is over: no longer running


def stage_progress(trainer, seconds_per_step: float) -> dict:
    """Where a stage is: its steps done and in all (a method's budget, or the trainer's schedule), the
    measured seconds per step and the remaining seconds at that rate (None where the total is unknown)."""
    done = trainer.position
    total = trainer.budget.limit if trainer.budget is not None else trainer.schedule_steps
    return {"stage": trainer.stage, "step": int(done), "total": int(total) if total else None,
            "seconds_per_step": seconds_per_step,
            "eta_seconds": max(0, total - done) * seconds_per_step if total else None}


def write_status(path: Path, label: str, trainer, seconds_per_step: float, last_val: Optional[float]) -> None:
    """The run's progress as a small JSON file, replaced whole (a reader never sees half of one)."""
    status = {"label": label, **stage_progress(trainer, seconds_per_step), "last_val": last_val,
              "updated": time.time()}
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(status))
    part.replace(path)


def running_runs(directory: Path, max_age: float = 600.0) -> List[dict]:
    """The progress of the runs writing status files in `directory` (OUT/.progress), oldest label first;
    a file not rewritten for `max_age` seconds is a run that was killed, and is left out."""
    out = []
    for path in sorted(Path(directory).glob("*.json")):
        try:
            status = json.loads(path.read_text())
        except (OSError, ValueError):       # removed or replaced meanwhile
            continue
        if time.time() - status.get("updated", 0) <= max_age:
            out.append(status)
    return out


def describe_running(status: dict) -> str:
    """"gmp resnet20_tiny sparsity=0.6: method 120/500, ETA 3m 10s, val 71.20%"."""
    where = f"{status['stage']} {status['step']}" + (f"/{status['total']}" if status.get("total") else "")
    eta = f", ETA {_duration(status['eta_seconds'])}" if status.get("eta_seconds") is not None else ""
    val = f", val {100 * status['last_val']:.2f}%" if status.get("last_val") is not None else ""
    return f"{status.get('label') or '?'}: {where}{eta}{val}"


def progress_line(trainer, seconds_per_step: float, last_val: Optional[float]) -> str:
    """"method step 1200/5000 (24%), 0.310 s/step, ETA 19m 38s, last val top-1 71.20%": the stage's steps
    (a method's budget, or the trainer's schedule) and its remaining time at the measured step time."""
    where = stage_progress(trainer, seconds_per_step)
    done, total = where["step"], where["total"]
    parts = [f"{trainer.stage} step {done}" + (f"/{total} ({100 * done / total:.0f}%)" if total else "")]
    parts.append(f"{seconds_per_step:.3f} s/step")
    if total:
        parts.append(f"ETA {_duration(where['eta_seconds'])}")
    if last_val is not None:
        parts.append(f"last val top-1 {100 * last_val:.2f}%")
    return ", ".join(parts)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def make_trackers(tracker: str, out: Path, run_id: str, params: Dict[str, Any], uri: Optional[str] = None,
                  stream=None) -> List[Tracker]:
    """The trackers a run logs to: TensorBoard unless `tracker` is "none"; MLflow as well for "mlflow".
    TensorBoard not installed: a one-line note, and the run goes on without it."""
    if tracker not in TRACKERS:
        raise ValueError(f"unknown tracker {tracker!r}; allowed: {', '.join(TRACKERS)}")
    stream = stream if stream is not None else sys.stderr
    trackers: List[Tracker] = []
    if tracker == "none":
        return trackers
    try:
        trackers.append(TensorBoardTracker(Path(out) / "tb" / run_id))
    except ImportError:
        print("sparsebench: note: tensorboard is not installed (pip install 'sparsebench[tensorboard]'); "
              "no live curves for this run", file=stream)
    if tracker == "mlflow":
        trackers.append(MlflowTracker(out, run_id, params, uri))     # asked for: its ImportError is the answer
    return trackers


_watches: List[Optional[RunWatch]] = [None]


def current_watch() -> Optional[RunWatch]:
    """The watch of the run in progress in this process (None outside one, and on ranks other than 0)."""
    return _watches[-1]


@contextlib.contextmanager
def use_watch(watch: Optional[RunWatch]) -> Iterator[Optional[RunWatch]]:
    """Within: trainers attach to `watch`; it is closed (sampler stopped, trackers flushed) at the end."""
    _watches.append(watch)
    try:
        yield watch
    finally:
        _watches.pop()
        if watch is not None:
            watch.close()

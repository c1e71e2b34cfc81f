"""Sweep launchers: where the runs of a sweep execute.

    local   the bounded process pool of `sweep --jobs N` (`runners/pool.py`), or in-process for one job;
            on CUDA each worker is pinned to a GPU of its own (`pool.plan_workers`, `--jobs-per-gpu`)
    ray     one Ray task per run, with the run's resources (CPUs = the spec's threads, one GPU when the
            device is CUDA), on a Ray instance started for the sweep (`num_cpus = --jobs`) or an
            existing cluster (`--address`)

Both call `run_one` for every run. It takes the run's lock without waiting (`RecordStore.lock`), and
skips a run whose record exists (or that another sweep is running right now), so two overlapping
sweeps on one store record every run exactly once. A run that raises is recorded with status
"failed" and its error (no metrics, so leaderboards leave it out); the sweep goes on, and
`--retry-failed` runs only those again.

Both stop on SIGINT or SIGTERM (`runners/pool.py`): the first one raises `Stopped` carrying the
summary so far; unfinished runs write no record. Ray's daemons and workers start with both signals
blocked, so a signal to the whole group is the driver's to act on; one sent to a Ray worker alone is
passed on to the driver.

A run whose dense checkpoint is locked by another process waits a few seconds (`LOCK_PATIENCE_S`),
then hands back ("waiting"): the launcher says once which lock, held by which pid on which host,
in what state and since when, runs the other runs meanwhile and comes back to it. After
`lock_timeout` seconds of such waits it gives up on the run ("blocked": not recorded, so a
later sweep runs it) and leaves the lock to its holder. A lock held by this sweep's own worker
(one checkpoint trained for several runs) is waited for without a word. A write the file system
refuses (`StorageError`: full, read-only, no permission) stops the sweep: the next run would fail
the same way.

The Ray launcher schedules each dense checkpoint once: one dense task per (model, data, seed,
pretrain recipe) whose cache file is missing, and every run task takes its dense task's object ref
as an argument, so Ray starts the run only when its checkpoint exists. No two workers train the
same checkpoint and none waits on the cache lock (the lock still guards against other sweeps).
A worker that dies is retried by Ray (`max_retries`); the retry resumes from the run's mid-fit
checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import socket
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

from sparsebench.platform import LockHolder, LockTimeout, StorageError, lock_holder, release_memory
from sparsebench.runners.checkpoints import dense_path
from sparsebench.runners.pipeline import (
    TRAINING_PHASES, PhaseTimes, RunOptions, cache_dir_of, execute, failed_record, prepare_dense,
)
from sparsebench.specs import RunSpec, SpecError, stable_hash
from sparsebench.store import RecordError, RecordStore

LAUNCHERS = ("local", "ray")
# Which existing records a sweep runs again: none, failed ones, or all (`--rerun`).
POLICIES = ("missing", "failed", "all")
RAY_MAX_RETRIES = 3            # a killed worker's run is retried; it resumes from its checkpoints
LOCK_PATIENCE_S = 5.0          # a run waits this long on a busy dense-checkpoint lock before handing back
log = logging.getLogger("sparsebench")
# Why `run_one` skips a run (the result's `error`); the sweep's summary counts each
SKIP_RECORDED = "already recorded"
SKIP_LOCKED = "another sweep is running it"


@dataclass
class RunResult:
    spec: dict
    status: str                    # done | failed | skipped | blocked (gave up on a lock) | waiting (comes back)
    seconds: float = 0.0
    error: Optional[str] = None    # failed: why; skipped, blocked, waiting: why
    lock: Optional[str] = None     # waiting, blocked: the lock file
    holder: Optional[LockHolder] = None
    phases: Dict[str, float] = field(default_factory=dict)   # done: seconds per phase (`PhaseTimes`)


@dataclass
class SweepSummary:
    launcher: str
    done: int = 0
    failed: int = 0
    skipped: int = 0
    blocked: int = 0               # given up on after --lock-timeout of lock waits (not recorded)
    dense_tasks: int = 0           # dense checkpoints scheduled as tasks of their own (ray)
    seconds: float = 0.0
    failures: List[RunResult] = field(default_factory=list)
    phases: Dict[str, float] = field(default_factory=dict)   # seconds per phase, summed over done runs
    skips: List[RunResult] = field(default_factory=list)     # the skipped runs, each with its reason

    def add(self, result: RunResult) -> None:
        setattr(self, result.status, getattr(self, result.status) + 1)
        if result.status in ("failed", "blocked"):
            self.failures.append(result)
        if result.status == "skipped":
            self.skips.append(result)
        for phase, seconds in result.phases.items():
            self.phases[phase] = self.phases.get(phase, 0.0) + seconds

    def overhead_line(self) -> str:
        """Where the done runs' time went besides training, in seconds per run (most first)."""
        if not self.done or not self.phases:
            return ""
        rest = {k: v for k, v in self.phases.items() if k not in TRAINING_PHASES}
        parts = ", ".join(f"{k} {v / self.done:.2f}" for k, v in sorted(rest.items(), key=lambda kv: -kv[1]))
        train = ", ".join(f"{k} {self.phases[k] / self.done:.2f}" for k in TRAINING_PHASES if k in self.phases)
        return (f"per run besides training: {sum(rest.values()) / self.done:.2f} s ({parts}); "
                f"training: {train} s per run, over {self.done} runs")

    def line(self) -> str:
        """The summary: the per-run overhead breakdown (when runs were done), then the counts line."""
        overhead = self.overhead_line()
        return ((f"{overhead}\n" if overhead else "")
                + f"sweep ({self.launcher}): {self.done} done, {self.failed} failed, {self.skipped} skipped"
                + (f", {self.blocked} gave up waiting on a lock" if self.blocked else "")
                + f" in {self.seconds:.1f} s" + (f"; {self.dense_tasks} dense checkpoints trained as tasks"
                                               if self.dense_tasks else ""))


    def skip_line(self, recorded_before: int = 0, unsupported: int = 0) -> str:
        """Every reason a run of the suite was not run, with its count: recorded when the sweep began
        (`recorded_before`: not counted as this sweep's skips) or when its turn came, held by another
        sweep (which pid on which host, in what process state, since when), unsupported (method, model)
        pairs (`unsupported`); "" when nothing was left out."""
        recorded = sum(r.error == SKIP_RECORDED for r in self.skips)
        locked = [r for r in self.skips if r.error == SKIP_LOCKED]
        parts = [f"{recorded_before} already recorded when the sweep began"] if recorded_before else []
        if recorded:
            parts.append(f"{recorded} recorded by another sweep meanwhile")
        if locked:
            holders = {}
            for r in locked:
                key = (r.holder.pid, r.holder.host) if r.holder else None
                holders.setdefault(key, [r, 0])[1] += 1
            said = "; ".join(f"{n} {r.holder.describe() if r.holder else 'held by a process that did not record itself'}"
                             for r, n in holders.values())
            parts.append(f"{len(locked)} another sweep is running ({said})")
        others = [r for r in self.skips if r.error not in (SKIP_RECORDED, SKIP_LOCKED)]
        parts += [f"1 {r.error}" for r in others]
        if unsupported:
            parts.append(f"{unsupported} unsupported (method, model) pairs")
        return "skipped: " + ", ".join(parts) if parts else ""


def wants_run(store: RecordStore, run_id: str, policy: str) -> bool:
    """Whether a run with this record state is (still) to be run under `policy`."""
    if policy == "all" or not store.exists(run_id):
        return True
    if policy == "missing":
        return False
    try:
        return store.read(run_id).status == "failed"
    except RecordError:             # a damaged record is no finished run
        return True


def run_one(spec_dict: dict, options: RunOptions, policy: str = "missing") -> RunResult:
    """One run in this process, at most once per store: errors become a failed record, not a raise."""
    from sparsebench.datasets import DataError

    spec = RunSpec.from_dict(spec_dict)
    store = RecordStore(options.out)
    start = time.perf_counter()
    with store.lock(spec.run_id) as mine:
        if not mine:
            lock = store.lock_path(spec.run_id)
            return RunResult(spec_dict, "skipped", error=SKIP_LOCKED, lock=str(lock), holder=lock_holder(lock))
        if not wants_run(store, spec.run_id, policy):
            return RunResult(spec_dict, "skipped", error=SKIP_RECORDED)
        times = PhaseTimes()
        try:
            execute(spec, options, times)
            return RunResult(spec_dict, "done", time.perf_counter() - start, phases=dict(times))
        except LockTimeout as e:        # its dense checkpoint is another process's for now
            status = "waiting" if options.lock_patience is not None else "blocked"
            return RunResult(spec_dict, status, time.perf_counter() - start, str(e), e.path, e.holder)
        except StorageError:            # the disk refuses writes: every next run would fail alike
            raise
        except (SpecError, DataError) as e:     # bad input for this run: its one line says it all
            error = f"{type(e).__name__}: {e}"
        except Exception as e:  # noqa: BLE001 -- a failed run must not stop the sweep
            error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
        store.write(failed_record(spec, error, options.device))
        return RunResult(spec_dict, "failed", time.perf_counter() - start, error)


def _record_failure(spec_dict: dict, options: RunOptions, error: str) -> RunResult:
    """A run whose worker never reported (crashed past its retries): recorded failed by the driver."""
    spec = RunSpec.from_dict(spec_dict)
    store = RecordStore(options.out)
    with store.lock(spec.run_id) as mine:
        if mine and not store.exists(spec.run_id):
            store.write(failed_record(spec, error, options.device))
    return RunResult(spec_dict, "failed", error=error)


# --- local ------------------------------------------------------------------------------------
class LockWaits:
    """Runs handed back while another process holds their dense checkpoint's lock: said once per lock
    (then once a minute), queued again, and given up after `timeout` seconds of waiting."""

    def __init__(self, timeout: Optional[float], patience: float):
        self.timeout, self.patience = timeout, patience
        self.since: Dict[str, float] = {}
        self.next_notice: Dict[str, float] = {}

    def final(self, result: RunResult) -> Optional[RunResult]:
        """None: run it again later; else the result to count (a give-up becomes "blocked")."""
        if result.status != "waiting":
            return result
        if _own(result.holder):           # this sweep's other worker is training it: just wait
            self.since.pop(result.lock, None)
            return None
        now = time.monotonic()
        waited = now - self.since.setdefault(result.lock, now) + self.patience
        holder = result.holder.describe() if result.holder else "held by a process that did not record itself"
        if self.timeout is not None and waited >= self.timeout:
            return dataclasses.replace(result, status="blocked", error=(
                f"gave up after {waited:.0f} s waiting for dense checkpoint lock {result.lock}, {holder}; "
                f"left to its holder, the run is not recorded (re-run the sweep once it is free)"))
        if now >= self.next_notice.get(result.lock, 0.0):
            self.next_notice[result.lock] = now + 60.0
            log.warning("sparsebench: waiting %.0f s for dense checkpoint lock %s, %s; running other runs meanwhile"
                        "%s", waited, result.lock, holder,
                        f" (giving up after {self.timeout:.0f} s)" if self.timeout is not None else "")
        return None


def _own(holder: Optional[LockHolder]) -> bool:
    from sparsebench.runners.pool import worker_pids

    return holder is not None and holder.local() and holder.pid in worker_pids()


def launch_local(specs: Sequence[RunSpec], options: RunOptions, jobs: int = 1, policy: str = "missing",
                 on_result: Optional[Callable[[RunResult], None]] = None,
                 devices: Optional[Sequence[str]] = None) -> SweepSummary:
    """Run `specs` in `jobs` workers (in this process for one). `devices` (`pool.plan_workers`): one per
    worker, the device each worker's runs use, so that runs on CUDA spread over the GPUs."""
    from sparsebench.runners.pool import Stopped, run_pool, stop_on_signals

    summary, start = SweepSummary("local"), time.perf_counter()
    options = dataclasses.replace(options, lock_patience=options.lock_patience or LOCK_PATIENCE_S)
    waits = LockWaits(options.lock_timeout, options.lock_patience)

    def collect(result: RunResult) -> bool:
        """Count a final result; False when the run is to be queued again."""
        result = waits.final(result)
        if result is None:
            return False
        summary.add(result)
        if on_result is not None:
            on_result(result)
        return True

    try:
        with stop_on_signals():
            if jobs > 1:
                options = dataclasses.replace(options, progress=None)   # one bar per worker would interleave
                run_pool(_run_payload, [(s.to_dict(), options, policy) for s in specs], jobs,
                         lambda r: None if collect(r) else [(r.spec, options, policy)], devices)
            else:
                if devices:
                    options = dataclasses.replace(options, device=devices[0])
                    _use_device(devices[0])
                queue = deque(s.to_dict() for s in specs)
                while queue:
                    spec_dict = queue.popleft()
                    if not collect(run_one(spec_dict, options, policy)):
                        queue.append(spec_dict)
    except Stopped as e:
        summary.seconds = time.perf_counter() - start
        e.summary = summary
        raise
    summary.seconds = time.perf_counter() - start
    return summary


def _run_payload(payload) -> RunResult:
    from sparsebench.runners.pool import worker_device

    spec_dict, options, policy = payload
    device = worker_device()
    if device is not None:           # this worker's own GPU: the run trains, times and is recorded there
        options = dataclasses.replace(options, device=device)
        _use_device(device)
    release_memory()                 # this run starts from what the worker's last run freed, not its peak
    return run_one(spec_dict, options, policy)


def _use_device(device: str) -> None:
    """Make `device` this process's current CUDA device, so that anything placed on plain "cuda" (a
    library's buffer, a stream) lands on this worker's GPU too, not on cuda:0."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))


# --- ray --------------------------------------------------------------------------------------
def resources(spec: RunSpec, options: RunOptions) -> dict:
    """What one run asks Ray for: its threads as CPUs, and a GPU when it trains on CUDA."""
    return {"num_cpus": max(1, spec.measure.threads),
            "num_gpus": 1 if str(options.device).startswith("cuda") else 0}


def _forward_stop_signals(driver: Optional[tuple]) -> None:
    """In a Ray worker on the driver's host: a stop signal sent to the worker alone is passed on to the
    driver, which stops the sweep and cancels this task (the worker inherited them blocked: unblocked)."""
    if driver is None or driver[0] != socket.gethostname() or threading.current_thread() is not threading.main_thread():
        return

    def forward(signum, frame):
        with contextlib.suppress(OSError):
            os.kill(driver[1], signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def _dense_task(spec_dict: dict, options: RunOptions, driver: Optional[tuple] = None) -> Optional[str]:
    """Train (or find) one dense checkpoint; its error as text, so the runs still run and record it."""
    _forward_stop_signals(driver)
    try:
        prepare_dense(RunSpec.from_dict(spec_dict), options)
        return None
    except Exception as e:  # noqa: BLE001 -- each run that needs it records the failure (or divergence),
        return f"{type(e).__name__}: {e}"    # or waits on the lock / stops on the full disk itself


def _run_task(spec_dict: dict, options: RunOptions, policy: str, dense_error: Optional[str],
              driver: Optional[tuple] = None) -> RunResult:
    del dense_error                 # the ref only orders this task after its dense task
    _forward_stop_signals(driver)
    return run_one(spec_dict, options, policy)


def launch_ray(specs: Sequence[RunSpec], options: RunOptions, jobs: int = 1, policy: str = "missing",
               address: Optional[str] = None, on_result: Optional[Callable[[RunResult], None]] = None,
               max_retries: int = RAY_MAX_RETRIES) -> SweepSummary:
    """Run `specs` as Ray tasks. Uses the Ray instance this process already joined, else starts a local
    one with `jobs` CPUs (or joins `address`) and shuts it down at the end."""
    import ray

    from sparsebench.runners.pool import Stopped, signals_blocked, stop_on_signals, stop_requested, take_stop_signals

    summary, start = SweepSummary("ray"), time.perf_counter()
    options = dataclasses.replace(options, progress=None, lock_patience=options.lock_patience or LOCK_PATIENCE_S)
    waits = LockWaits(options.lock_timeout, options.lock_patience)
    own = not ray.is_initialized()
    pending = {}
    try:
        with stop_on_signals():
            if own:
                # Ray's daemons and workers inherit the blocked mask: a signal to the whole process group
                # (Ctrl-C, kill -TERM -PGID) is the driver's to act on, not theirs to die of (a dead raylet
                # would end the driver at once, exit 1). ray.init sets handlers of its own: taken back.
                with signals_blocked():
                    if address:
                        ray.init(address=address, log_to_driver=False)
                    else:
                        ray.init(num_cpus=jobs, include_dashboard=False, log_to_driver=False)
                    take_stop_signals()
            driver = (socket.gethostname(), os.getpid())
            dense_remote = ray.remote(max_retries=max_retries)(_dense_task)
            run_remote = ray.remote(max_retries=max_retries)(_run_task)
            cache = cache_dir_of(options)
            dense_refs: Dict[str, object] = {}
            for s in specs:
                need = resources(s, options)
                key = stable_hash(s.dense_key())
                if key not in dense_refs:
                    dense_refs[key] = None if dense_path(s, cache).exists() else \
                        dense_remote.options(**need).remote(s.to_dict(), options, driver)
                    summary.dense_tasks += dense_refs[key] is not None
                ref = run_remote.options(**need).remote(s.to_dict(), options, policy, dense_refs[key], driver)
                pending[ref] = s
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1)
                s = pending.pop(ready[0])
                try:
                    result = ray.get(ready[0])
                except ray.exceptions.RayError as e:      # the worker died past its retries
                    result = _record_failure(s.to_dict(), options, f"{type(e).__name__}: {str(e).splitlines()[0]}")
                result = waits.final(result)
                if result is None:                        # its dense lock is another process's: later
                    pending[run_remote.options(**resources(s, options)).remote(s.to_dict(), options, policy, None, driver)] = s
                    continue
                summary.add(result)
                if on_result is not None:
                    on_result(result)
    except KeyboardInterrupt as e:   # Ray's waits turn the handler's `Stopped` into a plain KeyboardInterrupt
        stop = e if isinstance(e, Stopped) else Stopped(stop_requested() or signal.SIGINT)
        for ref in pending:                               # unfinished runs write no record; they resume
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        summary.seconds = time.perf_counter() - start
        stop.summary = summary
        raise stop from None
    finally:
        if own and ray.is_initialized():
            ray.shutdown()
    summary.seconds = time.perf_counter() - start
    return summary


def launch(launcher: str, specs: Sequence[RunSpec], options: RunOptions, jobs: int = 1, policy: str = "missing",
           address: Optional[str] = None, on_result: Optional[Callable[[RunResult], None]] = None,
           devices: Optional[Sequence[str]] = None) -> SweepSummary:
    if launcher == "local":
        return launch_local(specs, options, jobs, policy, on_result, devices)
    if launcher == "ray":
        return launch_ray(specs, options, jobs, policy, address, on_result)
    raise SpecError(f"unknown launcher {launcher!r}; allowed: {', '.join(LAUNCHERS)}")


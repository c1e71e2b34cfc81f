"""The local process pool of `sweep --jobs N`: stops when asked and leaves no orphans.

SIGINT or SIGTERM may reach any subset of the sweep's process group: the parent alone
(`kill -INT`), the workers alone, or all at once (Ctrl-C in a terminal), once or twice. The
parent decides: a worker that gets one passes it on to the parent and ends its own run (the
exception unwinds it, so temp files and locks are released), and the parent's first signal
raises `Stopped`; later ones (forwarded copies, a second Ctrl-C) are noted and ignored while
it ends every worker (SIGTERM, then SIGKILL) and re-raises. The sweep stops within seconds,
exit 128 + the signal: finished runs keep their records, unfinished ones write none (records
are written by atomic rename at the very end of a run) and resume from their checkpoints.
A worker also dies with the sweep when the sweep is killed outright: `PR_SET_PDEATHSIG` on
Linux (workers are forked by a fork server, the sweep's child, that exits with it), and a thread
that watches the sweep's pid anywhere.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import gc
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Tuple

PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
    """The sweep was asked to stop by a signal; `exit_code` is 128 + its number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
        self.summary = None            # what the launcher had finished, when it knows

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


class _StopState:
    signum: Optional[int] = None       # the first stop signal this process got
    ending = False                     # ending the workers: their forwarded signals are expected
    depth = 0


def stop_on_signals():
    """While inside: the first SIGINT or SIGTERM raises `Stopped` in the main thread, later ones are
    ignored (so the cleanup that follows is never cut short). Nested uses share the outer one.
    After a stop they stay ignored: the process is on its way out, and a second Ctrl-C must not
    cut its summary short; without one the previous handlers come back."""
    return _stop_on_signals()


@contextlib.contextmanager
def _stop_on_signals():
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _StopState.depth += 1
    previous = None
    if _StopState.depth == 1:
        _StopState.signum, _StopState.ending = None, False
        previous = {s: signal.signal(s, _on_stop_signal) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        _StopState.depth -= 1
        if previous is not None and _StopState.signum is None:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _on_stop_signal(signum, frame) -> None:
    if _StopState.signum is not None or _StopState.ending:
        return
    _StopState.signum = signum
    # Later stop signals are ignored at the OS level, not by this handler: the interpreter resets
    # Python-level handlers to the default at exit, and a second SIGTERM landing then would kill the
    # process with -15 after its summary line. SIG_IGN survives finalisation.
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    raise Stopped(signum)


def take_stop_signals() -> None:
    """Inside `stop_on_signals`: take the stop signals back from a library that set its own (Ray)."""
    if _StopState.depth and threading.current_thread() is threading.main_thread():
        for s in STOP_SIGNALS:
            signal.signal(s, _on_stop_signal)


def stop_requested() -> Optional[int]:
    return _StopState.signum


WORKER_MEMORY_BYTES = 600 * 2**20     # a worker's peak on the quick suite is about 450 MB (torch, timm, one run)


def auto_jobs(threads: int = 1) -> int:
    """`--jobs auto`: one worker per core this process may use (each running `threads` threads), fewer
    where the available memory holds fewer workers. On 2 cores this measured 1.7x faster than one worker."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:            # not Linux
        cores = os.cpu_count() or 1
    jobs = max(1, cores // max(1, threads))
    available = _available_memory()
    if available is not None:
        jobs = min(jobs, max(1, available // WORKER_MEMORY_BYTES))
    return jobs


def _available_memory() -> Optional[int]:
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    return None


def jobs_arg(text: str) -> Optional[int]:
    """The value of `--jobs`: None for `auto` (`plan_workers` resolves it once the device is known) or an
    integer (the sweep checks that it is >= 1)."""
    import argparse

    if str(text).strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --jobs {text!r}; allowed: auto or an integer >= 1") from None


class PlanError(ValueError):
    """Workers that cannot be placed as asked (one line saying why and what to ask instead)."""


@dataclass(frozen=True)
class WorkerPlan:
    """How many workers a local sweep runs, and on CUDA the device each one is pinned to."""

    jobs: int
    devices: Optional[Tuple[str, ...]] = None    # one per worker ("cuda:K"); None: every run on the sweep's --device


def plan_workers(device: str, jobs: Optional[int], jobs_per_gpu: Optional[int] = None,
                 gpus: Optional[Sequence[int]] = None) -> WorkerPlan:
    """The local pool for `--device`, `--jobs` (None: auto) and `--jobs-per-gpu`.

    On the CPU: `auto_jobs` workers for auto. On CUDA: one worker per visible GPU for auto (or per GPU
    of `cuda:K`: that one), `jobs_per_gpu` workers per GPU with `--jobs-per-gpu`, and each worker pinned
    to its own device; an explicit `--jobs` beyond GPUs x jobs-per-gpu is refused (those runs would share
    a GPU sized for one: out of memory). `gpus`: the GPU indices to use (default: the visible ones)."""
    kind, _, index = str(device).partition(":")
    if kind != "cuda":
        if jobs_per_gpu is not None:
            raise PlanError(f"--jobs-per-gpu needs --device cuda (got --device {device})")
        return WorkerPlan(auto_jobs() if jobs is None else jobs)
    if jobs_per_gpu is not None and jobs_per_gpu < 1:
        raise PlanError(f"bad --jobs-per-gpu {jobs_per_gpu}; allowed: an integer >= 1")
    if gpus is None:
        gpus = [int(index)] if index else list(range(visible_gpus()))
    if not gpus:
        raise PlanError(f"--device {device}: no CUDA GPU is visible here")
    per_gpu = jobs_per_gpu or 1
    # Round-robin over the GPUs, so that fewer workers than slots still spread over every GPU.
    slots = tuple(f"cuda:{g}" for _ in range(per_gpu) for g in gpus)
    if jobs is None:
        jobs = len(slots)
    elif jobs > len(slots):
        raise PlanError(
            f"--jobs {jobs} on --device {device} puts {jobs} runs on {len(gpus)} GPU(s) "
            f"({per_gpu} per GPU at most): use --jobs auto (one worker per GPU), or --jobs-per-gpu N to pack "
            f"N runs on each GPU once you know that N of them fit its memory")
    return WorkerPlan(jobs, slots[:jobs])


def visible_gpus() -> int:
    """The CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES applies), 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


_running_pools: list = []


def worker_pids() -> set:
    """The pids of this process's pool workers now (a lock one of them holds is this sweep's own)."""
    return {pid for pool in _running_pools for pid in (getattr(pool, "_processes", None) or {})}


def run_pool(fn: Callable[[Any], Any], payloads: Iterable[Any], jobs: int,
             on_result: Callable[[Any], Optional[Iterable[Any]]], devices: Optional[Sequence[str]] = None) -> None:
    """Run `fn` over `payloads` in `jobs` workers, calling `on_result` as each finishes; the payloads
    `on_result` returns are queued again (a run that waits on a lock comes back later). The workers are
    the ones `workers_forked_here` started, where it did, else new ones (`worker_context`).

    `devices`: one per worker, each worker's own (`worker_device` in it). Such workers always come from
    the fork server, never forked from this process: the sweep may have initialised the CUDA driver
    (counting or checking its GPUs), and a CUDA driver initialised before a fork is unusable in the child."""
    if devices is not None and len(devices) != jobs:
        raise ValueError(f"{len(devices)} devices for {jobs} workers")
    with stop_on_signals():
        pool = (_Prestarted.take(jobs) if devices is None else None) or _new_pool(jobs, worker_context(), devices)
        try:
            futures = _submit(pool, fn, payloads)
            while futures:
                done, futures = wait(futures, return_when=FIRST_COMPLETED)
                for f in done:
                    futures |= _submit(pool, fn, on_result(f.result()) or ())
        except BrokenProcessPool:
            end_workers(pool)
            if stop_requested() is not None:      # a worker died of the stop signal before we saw it
                raise Stopped(stop_requested()) from None
            raise
        except BaseException:
            end_workers(pool)
            raise
        finally:
            _running_pools.remove(pool)
        pool.shutdown(wait=True)


def _new_pool(jobs: int, context, devices: Optional[Sequence[str]] = None) -> ProcessPoolExecutor:
    slots = None
    if devices is not None:          # each worker takes one at its start (a pool starts at most `jobs` workers)
        slots = context.Queue()
        for device in devices:
            slots.put(device)
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_worker_init,
                               initargs=(os.getpid(), slots))
    _running_pools.append(pool)
    return pool


class _Prestarted:
    """The pool `workers_forked_here` started, until `run_pool` takes it."""
    pool: Optional[ProcessPoolExecutor] = None
    jobs = 0

    @classmethod
    def take(cls, jobs: int) -> Optional[ProcessPoolExecutor]:
        if cls.pool is None or cls.jobs != jobs:
            return None
        pool, cls.pool = cls.pool, None
        return pool


@contextlib.contextmanager
def workers_forked_here(jobs: int):
    """Fork the `jobs` workers of the next `run_pool(..., jobs)` now, from this process.

    The sweep calls this right after importing torch, timm and the harness, before it plans or runs
    anything: its workers then share those imports' memory with it, copy-on-write (about 450 MB of
    heap that torch and the libraries build at import, which a fork server would hold a third copy
    of), and start from the state a fork server would give them. The objects alive now are frozen
    out of the garbage collector (`gc.freeze`): its full passes write to every object they visit and
    would copy each shared page into each process. Workers no pool took are ended when the block
    exits. Without `fork` (not Linux), or for one job, it does nothing and `run_pool` starts its own."""
    if jobs <= 1 or not sys.platform.startswith("linux") or "fork" not in mp.get_all_start_methods():
        yield
        return
    with stop_on_signals():
        gc.freeze()
        pool = _new_pool(jobs, mp.get_context("fork"))
        with signals_blocked():            # the workers inherit the mask; their initializer takes a pending one
            pool.submit(os.getpid)         # a fork pool forks all of its workers at its first task
        _Prestarted.pool, _Prestarted.jobs = pool, jobs
        try:
            yield
        except BaseException:
            if _Prestarted.pool is pool:  # an error or a stop before the runs: the idle workers end now
                _release_prestarted(pool)
                end_workers(pool)
            raise
        if _Prestarted.pool is pool:      # nothing to run: the idle workers take their leave
            _release_prestarted(pool)
            pool.shutdown(wait=True)


def _release_prestarted(pool: ProcessPoolExecutor) -> None:
    _Prestarted.pool = None
    _running_pools.remove(pool)


def worker_context():
    """For a pool started without `workers_forked_here` (a library caller that may have run torch
    already, so that a fork of it could copy a thread pool's state mid-use): workers forked from a
    fork server that has only imported torch, timm and the harness (`runners/_fork_server.py`), so
    they share those imports' memory with each other. Without a fork server (not POSIX): spawned."""
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(["sparsebench.runners._fork_server"])
    return context


def _submit(pool: ProcessPoolExecutor, fn, payloads) -> set:
    # Workers are started inside submit(). The stop signals are blocked meanwhile: the children
    # inherit the mask, so a signal during their imports cannot interrupt them with a traceback
    # (their handler takes it once they are ready), and the parent gets it, pending, right after.
    with signals_blocked():
        return {pool.submit(_in_worker, fn, p) for p in payloads}


def end_workers(pool: ProcessPoolExecutor, grace: float = 3.0) -> None:
    """Cancel what has not started and end every worker now (their runs are unfinished)."""
    _StopState.ending = True
    processes = list((getattr(pool, "_processes", None) or {}).values())   # no public handle on the workers
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
    deadline = time.monotonic() + grace
    for p in processes:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(1.0)


@contextlib.contextmanager
def signals_blocked():
    """SIGINT and SIGTERM held back (pending) in this thread and in every process started meanwhile."""
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if can:
        signal.pthread_sigmask(signal.SIG_BLOCK, set(STOP_SIGNALS))
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))


# --- in the worker -----------------------------------------------------------------------------
class _WorkerStopped(BaseException):
    """Unwinds a worker's run after a stop signal (never caught by a run's `except Exception`)."""


class _Worker:
    parent_pid = 0
    busy = False
    stopping = False
    device: Optional[str] = None


def worker_device() -> Optional[str]:
    """In a pool worker started with `devices`: the device its runs use ("cuda:K"); else None."""
    return _Worker.device


def _worker_init(parent_pid: int, slots=None) -> None:
    _Worker.parent_pid = parent_pid
    if slots is not None:
        _Worker.device = slots.get(timeout=60)
    for s in STOP_SIGNALS:
        signal.signal(s, _worker_signal)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, set(STOP_SIGNALS))   # a pending one is taken now
    die_with_parent(parent_pid)


def _worker_signal(signum, frame) -> None:
    """The parent decides what a stop signal means: pass it on, then end this worker's run."""
    if _Worker.stopping:
        return
    _Worker.stopping = True
    with contextlib.suppress(OSError):
        os.kill(_Worker.parent_pid, signum)
    if not _Worker.busy:                      # between runs: nothing to unwind
        os._exit(128 + signum)
    raise _WorkerStopped(signum)


def _in_worker(fn, payload):
    if _Worker.stopping:
        os._exit(1)
    _Worker.busy = True
    try:
        return fn(payload)
    except _WorkerStopped as e:               # the run is unwound (temp files gone, locks released)
        os._exit(128 + e.args[0])
    finally:
        _Worker.busy = False


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    # The sweep (`parent_pid`) is this worker's grandparent: the fork server between them exits with
    # the sweep, and PDEATHSIG follows; the watch thread looks at the sweep itself.
    if not _alive(parent_pid):                        # the sweep died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if not _alive(parent_pid):
                os._exit(1)

    threading.Thread(target=watch, name="sparsebench-parent-watch", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:                           # exists, owned by someone else
        return True
    return True

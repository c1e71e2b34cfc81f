"""The local process pool of `sweep --jobs N`: stops when asked and leaves no orphans.

Ctrl-C reaches the whole foreground process group. Workers ignore it; the parent ends
them (SIGTERM, then SIGKILL) and re-raises, so the sweep stops within seconds: finished
runs keep their records, unfinished ones write none (records are written by atomic rename
at the very end of a run). A worker also dies with its parent when the parent is killed
outright: `PR_SET_PDEATHSIG` on Linux, and a thread that watches the parent's pid anywhere.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterable

PR_SET_PDEATHSIG = 1


def run_pool(fn: Callable[[Any], Any], payloads: Iterable[Any], jobs: int, on_result: Callable[[Any], None]) -> None:
    """Run `fn` over `payloads` in `jobs` spawned workers, calling `on_result` as each finishes."""
    pool = ProcessPoolExecutor(max_workers=jobs, mp_context=mp.get_context("spawn"),
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        # Workers are spawned inside submit(). SIGINT is blocked meanwhile: the children inherit the
        # mask, so a Ctrl-C during their imports cannot interrupt them with a traceback (they ignore
        # it once started), and the parent gets it, pending, as soon as the loop is done.
        with _sigint_blocked():
            futures = [pool.submit(fn, p) for p in payloads]
        for f in as_completed(futures):
            on_result(f.result())
    except BaseException:
        end_workers(pool)
        raise
    pool.shutdown(wait=True)


def end_workers(pool: ProcessPoolExecutor, grace: float = 3.0) -> None:
    """Cancel what has not started and end every worker now (their runs are unfinished)."""
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
def _sigint_blocked():
    can = hasattr(signal, "pthread_sigmask") and threading.current_thread() is threading.main_thread()
    if can:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        if can:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _worker_init(parent_pid: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides what Ctrl-C means
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})   # a pending one is now discarded
    die_with_parent(parent_pid)


def die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent_pid:                    # the parent died before prctl took effect
        os._exit(1)

    def watch():
        while True:
            time.sleep(1.0)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="sparsebench-parent-watch", daemon=True).start()

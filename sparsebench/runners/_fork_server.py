"""Imported by the sweep's fork server only (`pool.worker_context`): the modules every worker needs,
loaded once so that the forked workers share them, and a quiet end for a worker that was still
starting when its sweep stopped.

A worker forked as the sweep exits reads its start-up state from the sweep after the sweep has
removed the pool's semaphores; multiprocessing then prints a FileNotFoundError traceback from the
half-started worker. The run was never started and the sweep has already reported the stop, so
that one error ends the worker without a traceback; every other error is printed as usual.
"""
import sys

import sparsebench.runners.launchers  # noqa: F401  (torch, timm, the harness: what a worker runs)


def _quiet_when_the_sweep_is_gone(kind, error, tb, _print=sys.excepthook):
    frames, t = [], tb
    while t is not None:
        frames.append(t.tb_frame.f_code.co_name)
        t = t.tb_next
    if issubclass(kind, FileNotFoundError) and "__setstate__" in frames:
        return                       # a semaphore of the ended sweep's pool, read by a half-started worker
    _print(kind, error, tb)


sys.excepthook = _quiet_when_the_sweep_is_gone

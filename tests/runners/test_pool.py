"""`sweep --jobs N` under Ctrl-C and under a killed parent: stops within seconds, leaves no workers."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import two_run_suite


LONG_SUITE = textwrap.dedent("""
    name: long
    methods: [magnitude-global]
    models: [resnet20_tiny]
    datasets: [digits]
    targets: {sparsity: [0.5]}
    seeds: [0, 1, 2, 3]
    recipe: {pretrain_epochs: 200, finetune_epochs: 1, search_epochs: 1}
    data: {img_size: 16}
    measure: {latency: false}
""")


def _session_pids(sid: int):
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _start_sweep(tmp_path):
    suite = tmp_path / "long.yaml"
    suite.write_text(LONG_SUITE)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sparsebench", "sweep", str(suite), "--out", str(out), "--jobs", "2",
                             "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 120
    while len(_session_pids(proc.pid)) < 3:         # the sweep and its two workers, forked before it plans
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    time.sleep(0.5)
    return proc, out


def _wait_gone(sid: int, seconds: float):
    deadline = time.monotonic() + seconds
    while _session_pids(sid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _session_pids(sid)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
def test_ctrl_c_stops_a_parallel_sweep_within_seconds(tmp_path):
    proc, out = _start_sweep(tmp_path)
    os.killpg(proc.pid, signal.SIGINT)                                  # what Ctrl-C in a terminal does
    start = time.monotonic()
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - start < 15
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err
    assert _wait_gone(proc.pid, 5) == []
    assert list(out.glob("records/*.json")) == []                       # nothing finished, nothing recorded
    assert not list(out.glob("checkpoints/*.pt"))                       # no half-trained dense checkpoint


POOL_SCRIPT = textwrap.dedent("""
    import sys, time
    from sparsebench.runners.pool import run_pool
    try:
        run_pool(time.sleep, [600] * 4, 2, print)
    except KeyboardInterrupt as e:
        print("stopped", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 130))
""")


def _workers(sid: int):
    """The pool's workers in the session: the processes the fork server forked (not the sweep, not
    the fork server, not multiprocessing's resource tracker); spawned workers where there is no
    fork server."""
    found, server = [], set()
    info = {}
    for pid in _session_pids(sid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            ppid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        info[pid] = (cmd, ppid)
        if b"forkserver" in cmd and ppid == sid:
            server.add(pid)
    for pid, (cmd, ppid) in info.items():
        if ppid in server or (b"spawn_main" in cmd and b"resource_tracker" not in cmd):
            found.append(pid)
    return found


def _start_pool():
    proc = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], start_new_session=True,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while len(_workers(proc.pid)) < 2:                                   # two workers forked
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)                                                      # workers past their initializer
    return proc


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
@pytest.mark.parametrize("to,sig,times", [("group", signal.SIGINT, 1), ("parent", signal.SIGINT, 1),
                                          ("workers", signal.SIGINT, 1), ("one worker", signal.SIGTERM, 1),
                                          ("group", signal.SIGINT, 2), ("group", signal.SIGTERM, 1),
                                          ("parent", signal.SIGTERM, 2)])
def test_a_stop_signal_to_any_part_of_the_pool_ends_it_now(to, sig, times):
    """Ten-minute tasks: the signal to the terminal's process group (Ctrl-C), to the parent alone
    (kill -INT), to the workers alone, to one worker, once or twice in a row: the pool ends within
    seconds, exit 128 + the signal, no process of it left, no traceback."""
    proc = _start_pool()
    workers = _workers(proc.pid)
    assert len(workers) == 2
    for _ in range(times):
        if to == "group":
            os.killpg(proc.pid, sig)
        elif to == "parent":
            os.kill(proc.pid, sig)
        else:
            for pid in workers[:1] if to == "one worker" else workers:
                with contextlib.suppress(ProcessLookupError):    # the first one may have ended them all
                    os.kill(pid, sig)
        time.sleep(0.05)
    start = time.monotonic()
    try:
        assert proc.wait(timeout=20) == 128 + sig and time.monotonic() - start < 10
        err = proc.stderr.read()
        assert err.count("stopped") == 1 and "Traceback" not in err, err
        assert _wait_gone(proc.pid, 5) == []
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
def test_killing_the_parent_leaves_no_orphan_workers(tmp_path):
    """The sweep's pool with workers that would sleep for ten minutes: SIGKILL the parent, and they go too."""
    proc = _start_pool()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        assert _wait_gone(proc.pid, 10) == []
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the sweep forks its workers itself on Linux")
def test_a_parallel_sweep_forks_its_workers_from_itself_and_takes_them_along(tmp_path):
    """The workers of `sweep --jobs 2` are the sweep's own forks (they share its imports' memory: no fork
    server, no re-import), and SIGKILL to the sweep alone still takes them with it."""
    proc, _ = _start_sweep(tmp_path)
    try:
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        others = [pid for pid in _session_pids(proc.pid) if pid != proc.pid]
        assert len(others) == 2
        for pid in others:
            assert int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1]) == proc.pid
            assert Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline         # forked, not started anew
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        assert _wait_gone(proc.pid, 10) == []
    finally:
        for pid in _session_pids(proc.pid):
            os.kill(pid, signal.SIGKILL)


MIXED_SUITE = two_run_suite("mixed", 300)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
def test_sigterm_twice_to_the_group_in_the_dense_phase_keeps_finished_runs_and_partial_checkpoints(tmp_path):
    """One run finishes while the other's worker trains a long dense checkpoint: SIGTERM twice to
    the whole group stops the sweep (143) with one summary line; the finished record stays as it
    was, the unfinished run has no record, and its dense pretrain left a loadable mid-fit checkpoint
    to resume from (and no temp file, no half-written cache file)."""
    import torch

    suite = tmp_path / "mixed.yaml"
    suite.write_text(MIXED_SUITE)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "sparsebench", "sweep", str(suite), "--out", str(out), "--jobs", "2",
                             "--quiet", "--checkpoint-every", "5"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 150
    try:
        while not (list(out.glob("records/*.json")) and list(out.glob("checkpoints/partial/dense-*/fit-0.pt"))):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        finished = {p.name: p.stat().st_mtime_ns for p in out.glob("records/*.json")}
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - start < 15
    assert proc.returncode == 143, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "1 done" in lines[0] and "1 unfinished" in lines[0] and "Traceback" not in err, err
    assert _wait_gone(proc.pid, 5) == []
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("records/*.json")} == finished
    assert len(finished) == 1
    partial = sorted(out.glob("checkpoints/partial/dense-*/fit-0.pt"))
    assert len(partial) == 1 and torch.load(partial[0], weights_only=True)["trainer"]["step"] > 0
    assert len(list(out.glob("checkpoints/dense-*.pt"))) == 1           # only the finished run's dense model
    assert not [p for p in out.rglob("*.tmp")]


def test_jobs_auto_is_the_sweep_default_and_one_worker_per_usable_core(monkeypatch):
    from sparsebench.cli import build_parser
    from sparsebench.runners import pool

    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    monkeypatch.setattr(pool, "_available_memory", lambda: 64 * 2**30)
    assert pool.auto_jobs() == 3 and pool.jobs_arg("auto") is None and pool.jobs_arg("5") == 5
    args = build_parser().parse_args(["sweep", "suite.yaml"])
    assert args.jobs is None and pool.plan_workers(args.device, args.jobs).jobs == 3   # auto, resolved per device
    monkeypatch.setattr(pool, "_available_memory", lambda: pool.WORKER_MEMORY_BYTES * 2 + 1)
    assert pool.auto_jobs() == 2                       # no more workers than the free memory holds


def test_a_pool_worker_hands_freed_memory_back_before_every_run(monkeypatch):
    """A worker runs many runs: what one run freed (a P-GaP run's replicas) is returned to the system
    before the next starts (`platform.release_memory`), and the result is reported without waiting on it."""
    from sparsebench.runners import launchers

    events = []
    monkeypatch.setattr(launchers, "release_memory", lambda: events.append("release"))
    monkeypatch.setattr(launchers, "run_one", lambda spec, options, policy: events.append("run") or "result")
    assert launchers._run_payload(({}, None, "missing")) == "result"
    assert launchers._run_payload(({}, None, "missing")) == "result"
    assert events == ["release", "run", "release", "run"]

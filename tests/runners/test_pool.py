"""`sweep --jobs N` under Ctrl-C and under a killed parent: stops within seconds, leaves no workers."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest


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
    while len(_session_pids(proc.pid)) < 3:         # parent + two workers, still importing: the worst moment
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
    records = list((out / "records").glob("*")) if (out / "records").exists() else []
    assert records == []                                                 # nothing finished, nothing recorded
    assert not list(out.glob("checkpoints/*.pt"))                       # no half-trained dense checkpoint


POOL_SCRIPT = textwrap.dedent("""
    import sys, time
    from sparsebench.runners.pool import run_pool
    try:
        run_pool(time.sleep, [600] * 4, 2, print)
    except KeyboardInterrupt:
        sys.exit(130)
""")


def _start_pool():
    proc = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], start_new_session=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while len(_session_pids(proc.pid)) < 3:                             # parent + two workers
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.1)
    time.sleep(1.0)                                                      # workers past their initializer
    return proc


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
@pytest.mark.parametrize("to", ["group", "parent"])
def test_interrupting_the_pool_ends_its_workers_now(to):
    """Ten-minute tasks: SIGINT to the terminal's process group, or to the parent alone (kill -INT)."""
    proc = _start_pool()
    if to == "group":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGINT)
    start = time.monotonic()
    try:
        assert proc.wait(timeout=20) == 130 and time.monotonic() - start < 10
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

"""Sweep launchers on a real local Ray instance (2 CPUs): every run recorded exactly once, dense
checkpoints trained once as tasks of their own, a killed worker's run retried and resumed, two
overlapping sweeps on one store, failed runs recorded and `--retry-failed`."""
import contextlib
import os
import signal
import textwrap
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: the ray launcher is optional")

from sparsebench.runners.launchers import launch_local, launch_ray  # noqa: E402
from sparsebench.runners.pipeline import RunOptions, resolve  # noqa: E402
from sparsebench.runners.suite import load_suite  # noqa: E402
from sparsebench.store import load_records  # noqa: E402

TINY = textwrap.dedent("""
    name: tiny
    methods: {methods}
    models: [resnet20_tiny]
    datasets: [digits]
    targets: {{sparsity: [0.5]}}
    seeds: [0, 1]
    recipe: {{pretrain_epochs: {pretrain}, finetune_epochs: 0.2, search_epochs: 0.2}}
    data: {{img_size: 16}}
    measure: {{latency: false}}
""")


def specs(tmp_path, methods="[dense, magnitude-global]", pretrain=0.3):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY.format(methods=methods, pretrain=pretrain))
    return [resolve(s) for s in load_suite(suite).specs]


@pytest.fixture(scope="module")
def local_ray():
    root = str(Path(__file__).resolve().parents[2])
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)     # where Ray itself may live
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}})
    try:
        yield
    finally:
        ray.shutdown()


def _record_names(out):
    return sorted(p.name for p in (out / "records").glob("*.json"))


@pytest.mark.slow
def test_ray_sweep_records_each_run_once_and_trains_each_dense_checkpoint_once(tmp_path, local_ray):
    todo, out = specs(tmp_path), tmp_path / "out"
    assert len(todo) == 4
    summary = launch_ray(todo, RunOptions(out=out))
    assert (summary.done, summary.failed, summary.skipped, summary.dense_tasks) == (4, 0, 0, 2)
    assert _record_names(out) == sorted(f"{s.run_id}.json" for s in todo)
    assert all(r.status == "ok" for r in load_records(out))
    assert len(list((out / "checkpoints").glob("dense-*.pt"))) == 2
    assert not list((out / "checkpoints").glob("*.bad-*")) and not list(out.glob("**/fit-*.pt"))
    again = launch_ray(todo, RunOptions(out=out))                  # resumed sweep: nothing runs twice
    assert (again.done, again.skipped, again.dense_tasks) == (0, 4, 0)


def _ray_pids(title):
    pids = []
    for cmd in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmd.read_bytes().startswith(title.encode()):
                pids.append(int(cmd.parent.name))
        except OSError:
            pass
    return pids


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_retried_and_every_run_recorded_once(tmp_path, local_ray):
    todo, out = specs(tmp_path, methods="[magnitude-global]", pretrain=1.0), tmp_path / "out"
    results = {}
    sweep = threading.Thread(target=lambda: results.update(s=launch_ray(todo, RunOptions(out=out, checkpoint_every=2))))
    sweep.start()
    killed, deadline = [], time.monotonic() + 300     # generous: a loaded 2-core machine starts Ray slowly
    while not killed and time.monotonic() < deadline:
        pids = _ray_pids("ray::_dense_task") + _ray_pids("ray::_run_task")
        if pids and list(out.glob("**/fit-*.pt")):                # mid-fit, a checkpoint saved
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.05)
    sweep.join(600)
    assert not sweep.is_alive(), "the sweep did not finish within 10 minutes"
    assert killed, "no worker was seen running"
    summary = results["s"]
    assert (summary.done, summary.failed) == (2, 0)
    assert _record_names(out) == sorted(f"{s.run_id}.json" for s in todo)
    assert all(r.status == "ok" for r in load_records(out))
    again = launch_ray(todo, RunOptions(out=out))
    assert (again.done, again.skipped) == (0, 2)


@pytest.mark.slow
def test_two_overlapping_sweeps_record_each_run_exactly_once(tmp_path, local_ray):
    todo, out = specs(tmp_path, methods="[dense]"), tmp_path / "out"
    summaries = []
    sweeps = [threading.Thread(target=lambda: summaries.append(launch_ray(todo, RunOptions(out=out))))
              for _ in range(2)]
    for t in sweeps:
        t.start()
    for t in sweeps:
        t.join(600)
    assert not any(t.is_alive() for t in sweeps), "a sweep did not finish within 10 minutes"
    assert len(summaries) == 2 and sum(s.failed for s in summaries) == 0
    assert sum(s.done for s in summaries) == len(todo) == 2           # each run ran in one sweep only
    assert sum(s.skipped for s in summaries) == len(todo)
    assert _record_names(out) == sorted(f"{s.run_id}.json" for s in todo)


@pytest.mark.slow
def test_a_failing_run_is_recorded_failed_and_retry_failed_reruns_only_it(tmp_path, local_ray, capsys):
    from sparsebench.cli import main
    from sparsebench.runners.checkpoints import dense_path

    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY.format(methods="[dense]", pretrain=0.3))
    out = tmp_path / "out"
    seed1 = [s for s in specs(tmp_path, methods="[dense]") if s.seed == 1][0]
    blocker = dense_path(seed1, out / "checkpoints").with_suffix(".lock")
    blocker.mkdir(parents=True)                     # seed 1's dense cache lock cannot be opened: it fails
    code = main(["sweep", str(suite), "--out", str(out), "--quiet", "--launcher", "ray"])
    text, err = capsys.readouterr()
    assert code == 1 and "1 done, 1 failed, 0 skipped" in text and "IsADirectoryError" in err
    records = {r.seed: r for r in load_records(out)}
    assert records[0].status == "ok" and records[1].status == "failed" and records[1].test_top1 is None
    ok_file = out / "records" / f"{records[0].run_id}.json"
    before = ok_file.stat().st_mtime_ns
    code = main(["sweep", str(suite), "--out", str(out), "--quiet", "--launcher", "ray"])
    assert code == 0 and "0 to run" in capsys.readouterr()[0]      # a failure is recorded, not retried
    blocker.rmdir()
    code = main(["sweep", str(suite), "--out", str(out), "--quiet", "--launcher", "ray", "--retry-failed"])
    text = capsys.readouterr()[0]
    assert code == 0 and "1 to run" in text and "1 done, 0 failed, 0 skipped" in text
    assert {r.seed: r.status for r in load_records(out)} == {0: "ok", 1: "ok"}
    assert ok_file.stat().st_mtime_ns == before


def test_local_launcher_summary_and_lock(tmp_path):
    from sparsebench.store import RecordStore

    todo, out = specs(tmp_path, methods="[dense]")[:1], tmp_path / "out"
    with RecordStore(out).lock(todo[0].run_id):                  # another sweep is running it
        summary = launch_local(todo, RunOptions(out=out))
    assert (summary.done, summary.failed, summary.skipped) == (0, 0, 1)
    assert _record_names(out) == []


LONG = TINY.replace("seeds: [0, 1]", "seeds: [0]")


def _session_pids(sid):
    from tests.runners.test_pool import _session_pids as pids

    return pids(sid)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc to find the workers")
@pytest.mark.parametrize("to,sig", [("group", signal.SIGINT), ("workers", signal.SIGTERM)])
def test_a_stop_signal_ends_a_ray_sweep_within_seconds(tmp_path, to, sig):
    """Ctrl-C to the whole process group (driver, raylet, workers), or SIGTERM to the Ray workers
    alone, twice: the sweep exits 128 + signal within seconds with one summary line, nothing of the
    session is left, and the dense pretrains left mid-fit checkpoints (no record, no cache file)."""
    import subprocess
    import sys

    suite = tmp_path / "long.yaml"
    suite.write_text(LONG.format(methods="[dense, magnitude-global]", pretrain=300))
    out = tmp_path / "out"
    path = os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")])
    proc = subprocess.Popen([sys.executable, "-m", "sparsebench", "sweep", str(suite), "--out", str(out), "--jobs", "2",
                             "--launcher", "ray", "--quiet", "--checkpoint-every", "5"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 180
    try:
        while not list(out.glob("checkpoints/partial/dense-*/fit-0.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        for _ in range(2):
            if to == "group":
                os.killpg(proc.pid, sig)
            else:
                for stat in Path("/proc").glob("[0-9]*/cmdline"):
                    with contextlib.suppress(OSError):
                        if stat.read_bytes().startswith(b"ray::_"):
                            os.kill(int(stat.parent.name), sig)
            time.sleep(0.1)
        start = time.monotonic()
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert time.monotonic() - start < 20
    assert proc.returncode == 128 + sig, err
    lines = [line for line in err.splitlines() if "interrupted" in line]
    assert len(lines) == 1 and "2 unfinished" in lines[0] and "Traceback" not in err, err
    wait_until = time.monotonic() + 10
    while _session_pids(proc.pid) and time.monotonic() < wait_until:
        time.sleep(0.2)
    assert _session_pids(proc.pid) == []
    assert not list(out.glob("records/*.json")) and not list(out.glob("checkpoints/dense-*.pt"))

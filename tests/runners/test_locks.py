"""Lock waits are visible and bounded: a dense-checkpoint lock held by a live but stopped process
(SIGSTOP) is reported with its holder's pid, host, process state and start time, the sweep runs
the other runs meanwhile, gives up after --lock-timeout leaving the lock to its holder, and a dead
holder's lock is simply taken."""
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from conftest import two_run_suite

from sparsebench import platform
from sparsebench.runners import launchers
from sparsebench.runners.checkpoints import dense_path
from sparsebench.runners.pipeline import resolve
from sparsebench.runners.suite import load_suite

# A holder without sparsebench (fast to start): takes the lock, records itself as file_lock does.
HOLDER = textwrap.dedent("""
    import fcntl, json, os, socket, sys, time
    f = open(sys.argv[1], "a+")
    fcntl.flock(f, fcntl.LOCK_EX)
    f.truncate(0)
    f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}))
    f.flush()
    print("held", flush=True)
    time.sleep(600)
""")


def _stopped_holder(path: Path) -> subprocess.Popen:
    path.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    os.kill(proc.pid, signal.SIGSTOP)
    return proc


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_the_lock_file_records_its_holder(tmp_path):
    path = tmp_path / "x.lock"
    before = time.time()
    with platform.file_lock(path) as mine:
        assert mine
        holder = platform.lock_holder(path)
        assert (holder.pid, holder.host) == (os.getpid(), socket.gethostname())
        assert before - 1 <= holder.since <= time.time() + 0.01 and holder.state() == "running"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the holder's state from /proc")
def test_a_wait_on_a_stopped_holder_says_who_and_gives_up_then_a_dead_holders_lock_is_taken(tmp_path, caplog):
    path = tmp_path / "dense.lock"
    holder = _stopped_holder(path)
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="sparsebench"):
            with pytest.raises(platform.LockTimeout) as gave_up:
                with platform.file_lock(path, timeout=1.2, notice_after=0.4, what="dense checkpoint"):
                    pytest.fail("the lock is held")
        assert 1.2 <= time.monotonic() - start < 5
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(json.loads(path.read_text())["since"]))
        notices = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
        assert len(notices) == 1
        for line in (notices[0], str(gave_up.value)):
            assert f"dense checkpoint lock {path}, held by pid {holder.pid} on {socket.gethostname()} (stopped) " \
                   f"since {when}" in line and "\n" not in line
        assert str(gave_up.value).startswith("gave up after 1 s waiting") and "left to its holder" in str(gave_up.value)
        with platform.file_lock(path, blocking=False) as mine:
            assert not mine                                   # still the holder's
        holder.kill()
        holder.wait()
        with platform.file_lock(path, timeout=2) as mine:     # stale: its holder is dead
            assert mine and platform.lock_holder(path).pid == os.getpid()
    finally:
        _end(holder)


SUITE = two_run_suite("locks", 0.4)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the holder's state from /proc")
def test_a_sweep_runs_the_other_runs_and_gives_up_on_the_locked_one(tmp_path, capsys, caplog, monkeypatch):
    from sparsebench.cli import main

    suite = tmp_path / "locks.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "out"
    blocked, free = [resolve(s) for s in load_suite(suite).specs]
    lock = dense_path(blocked, out / "checkpoints").with_suffix(".lock")
    holder = _stopped_holder(lock)
    monkeypatch.setattr(launchers, "LOCK_PATIENCE_S", 0.5)
    try:
        with caplog.at_level(logging.WARNING, logger="sparsebench"):
            code = main(["sweep", str(suite), "--jobs", "1", "--out", str(out), "--quiet", "--lock-timeout", "3"])
        assert holder.poll() is None and platform.lock_holder(lock).pid == holder.pid   # left to its holder
    finally:
        _end(holder)
    captured = capsys.readouterr()
    assert code == 1
    assert [p.name for p in out.glob("records/*.json")] == [f"{free.run_id}.json"]   # the other run went on
    notices = [r.getMessage() for r in caplog.records if "waiting" in r.getMessage()]
    assert len(notices) == 1 and f"held by pid {holder.pid} on {socket.gethostname()} (stopped)" in notices[0] \
        and "running other runs meanwhile" in notices[0]
    assert "1 done, 0 failed, 0 skipped, 1 gave up waiting on a lock" in captured.out
    failed = [line for line in captured.err.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 1 and "gave up after" in failed[0] and str(lock) in failed[0] and "(stopped)" in failed[0]


ONE_RUN = textwrap.dedent("""
    name: held
    methods: [magnitude-global]
    models: [resnet20_tiny]
    datasets: [digits]
    targets: {sparsity: [0.5]}
    recipe: {pretrain_epochs: 20, finetune_epochs: 0.2, search_epochs: 0.2}   # long enough to be stopped mid-run
    data: {img_size: 16}
    measure: {latency: false}
""")


def _first_sweep(suite, out):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from sparsebench.cli import main

    os._exit(main(["sweep", str(suite), "--jobs", "1", "--out", str(out), "--quiet"]))


@pytest.mark.skipif(not (hasattr(os, "fork") and Path("/proc/self/stat").exists()),
                    reason="forks the first sweep; reads its state from /proc")
def test_a_second_sweep_names_the_stopped_sweep_that_holds_its_run(tmp_path, capsys):
    import multiprocessing as mp

    from sparsebench.cli import main

    suite = tmp_path / "held.yaml"
    suite.write_text(ONE_RUN)
    out = tmp_path / "out"
    (run,) = [resolve(s) for s in load_suite(suite).specs]
    lock = out / "records" / ".locks" / f"{run.run_id}.lock"
    first = mp.get_context("fork").Process(target=_first_sweep, args=(suite, out))   # torch already imported
    first.start()
    try:
        deadline = time.monotonic() + 60
        while not (lock.exists() and getattr(platform.lock_holder(lock), "pid", None) == first.pid):
            assert first.is_alive() and time.monotonic() < deadline, "the first sweep never took its run's lock"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)
        since = time.strftime("%Y-%m-%d %H:%M", time.localtime(platform.lock_holder(lock).since))
        code = main(["sweep", str(suite), "--jobs", "1", "--out", str(out), "--quiet"])
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.join()
    text = capsys.readouterr().out
    assert code == 0 and "0 done, 0 failed, 1 skipped" in text
    skipped = next(line for line in text.splitlines() if line.startswith("skipped: "))
    assert skipped.startswith(f"skipped: 1 another sweep is running (1 held by pid {first.pid} on "
                              f"{socket.gethostname()} (stopped) since {since}")


def test_the_sweep_summary_names_each_skip_reason_with_its_count(tmp_path):
    from sparsebench.runners.pipeline import RunOptions
    from sparsebench.store import RecordStore

    (run,) = [resolve(s) for s in load_suite(_write(tmp_path / "held.yaml", ONE_RUN)).specs]
    out = tmp_path / "out"
    with RecordStore(out).lock(run.run_id):                  # another sweep (here: this process) is running it
        summary = launchers.launch_local([run], RunOptions(out=out))
    assert (summary.done, summary.failed, summary.skipped) == (0, 0, 1)
    line = summary.skip_line(recorded_before=3, unsupported=2)
    assert line.startswith(f"skipped: 3 already recorded when the sweep began, 1 another sweep is running (1 held by pid {os.getpid()} "
                           f"on {socket.gethostname()} (running) since ")
    assert line.endswith(" s ago)), 2 unsupported (method, model) pairs")
    assert launchers.SweepSummary("local").skip_line() == ""


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path

"""The timing section (platform.TimingSection): timing waits for the steps in flight, and every
other process's work waits for the timing, however many steps it has queued; a dead holder frees it."""
import multiprocessing as mp
import os
import signal
import time
from pathlib import Path

import pytest

from sparsebench.platform import TimingSection, timing_section, use_timing_section

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the other worker")
ctx = mp.get_context("fork") if hasattr(os, "fork") else None


@pytest.fixture(autouse=True)
def _no_flag_left(tmp_path):
    """Each test's section flag (in /dev/shm) goes with its temp folder."""
    from sparsebench.platform import flag_path

    yield
    flag_path(tmp_path / "timing").unlink(missing_ok=True)


def _time_exclusively(path, ready, hold, stamps):
    section = TimingSection(path)
    with section.exclusive() as exclusive:
        stamps[0] = time.monotonic()
        ready.set()
        time.sleep(hold)
        stamps[1] = time.monotonic() if exclusive else -1.0


def _pass_the_gate_then_wait(path, ready, stamps):
    section = TimingSection(path)
    ready.set()
    with section.exclusive():
        stamps[0] = time.monotonic()


def test_work_waits_while_another_process_times(tmp_path):
    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    timer = ctx.Process(target=_time_exclusively, args=(path, ready, 0.5, stamps))
    timer.start()
    assert ready.wait(10)
    section = TimingSection(path)
    with section.work():
        started = time.monotonic()
    timer.join(10)
    assert stamps[1] > 0 and started >= stamps[1]                  # not one step while the other timed
    assert section.paused_seconds >= 0.3


def test_timing_waits_for_the_step_in_flight_and_new_steps_wait_for_it(tmp_path):
    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    section = TimingSection(path)
    with section.work():                                          # a step in flight
        timer = ctx.Process(target=_pass_the_gate_then_wait, args=(path, ready, stamps))
        timer.start()
        assert ready.wait(10)
        time.sleep(0.3)                                           # the timer has closed the gate by now
        step_ended = time.monotonic()
    with section.work():                                          # the next step: after the timing
        next_step = time.monotonic()
    timer.join(10)
    assert stamps[0] >= step_ended and next_step >= stamps[0]


def test_a_killed_timer_leaves_no_one_paused(tmp_path):
    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    timer = ctx.Process(target=_time_exclusively, args=(path, ready, 60.0, stamps))
    timer.start()
    assert ready.wait(10)
    os.kill(timer.pid, signal.SIGKILL)
    timer.join(10)
    start = time.monotonic()
    with TimingSection(path).work():
        pass
    assert time.monotonic() - start < 5.0


def test_nested_work_holds_the_section_until_the_outer_step_ends(tmp_path):
    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    with use_timing_section(path) as section:
        assert timing_section() is section
        with section.work():
            with section.work():                                   # an evaluation inside a step
                pass
            timer = ctx.Process(target=_pass_the_gate_then_wait, args=(path, ready, stamps))
            timer.start()
            assert ready.wait(10)
            time.sleep(0.3)
            still_held = time.monotonic()
            with pytest.raises(RuntimeError):
                with section.exclusive():
                    pass
        timer.join(10)
    assert stamps[0] >= still_held                                 # the inner exit did not release it
    assert not isinstance(timing_section(), TimingSection)          # outside: no section, timing not exclusive
    with timing_section().exclusive() as exclusive:
        assert exclusive is False


@pytest.fixture
def no_time_based_release(monkeypatch):
    """Only a timer's flag lets a hold go (the time-based safety net pushed out of the way)."""
    from sparsebench import platform

    monkeypatch.setattr(platform, "HOLD_RENEW_S", 3600.0)
    monkeypatch.setattr(platform, "IDLE_RELEASE_S", 3600.0)


def test_training_steps_and_evaluation_batches_take_no_lock_each_without_a_timer(tmp_path, monkeypatch,
                                                                                no_time_based_release):
    """`flock` on the NFS `--out` costs about 1 ms: with no one timing, 40 training steps and 8 evaluation
    batches pass the gate once, not 4 lock calls each."""
    import fcntl

    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from sparsebench.specs import Recipe
    from sparsebench.training.trainer import Trainer, evaluate

    calls = []
    real_flock = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda f, op: (calls.append(op), real_flock(f, op))[1])
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    loader = DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8, shuffle=True)
    model = nn.Linear(4, 2)
    with use_timing_section(tmp_path / "timing"):
        Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1).fit(40)
        evaluate(model, DataLoader(TensorDataset(x, (x[:, 0] > 0).long()), batch_size=8), torch.device("cpu"), 2)
    assert 3 <= len(calls) <= 4, calls        # the gate passed once (3), the hold let go at the end (1)


def _time_once(path, ready, hold, stamps):
    section = TimingSection(path)
    ready.set()
    with section.exclusive():
        stamps[0] = time.monotonic()
        time.sleep(hold)
        stamps[1] = time.monotonic()


def test_a_holder_between_steps_lets_a_timer_in_at_once_and_waits_for_it(tmp_path, no_time_based_release):
    """A worker keeps its hold after a step; a timer's flag makes it let go while it is between steps,
    and its next step waits for the timing to end."""
    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    section = TimingSection(path)
    with section.work():
        pass
    timer = ctx.Process(target=_time_once, args=(path, ready, 0.5, stamps))
    asked = time.monotonic()
    timer.start()
    assert ready.wait(10)
    deadline = time.monotonic() + 10
    while not stamps[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 0 < stamps[0] - asked < 5.0                              # in, without waiting an hour for an idle release
    with section.work():
        next_step = time.monotonic()
    timer.join(10)
    assert next_step >= stamps[1]
    section.close()


def test_steady_steps_pause_at_the_next_step_while_another_process_times(tmp_path, no_time_based_release):
    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    section = TimingSection(path)
    spans, timer = [], None
    end = time.monotonic() + 30
    while time.monotonic() < end:
        with section.work():
            begun = time.monotonic()
            time.sleep(0.005)
        spans.append((begun, time.monotonic()))
        if timer is None and len(spans) == 20:
            timer = ctx.Process(target=_time_once, args=(path, ready, 0.3, stamps))
            timer.start()
        if stamps[1] and len(spans) > 20 and spans[-1][0] > stamps[1]:
            break
    timer.join(10)
    assert stamps[1] > stamps[0] > 0
    assert not [s for s in spans if s[0] < stamps[1] and s[1] > stamps[0]]   # no step overlapped the timing
    section.close()


def test_a_killed_timers_flag_is_cleared_by_the_next_step(tmp_path):
    from sparsebench.platform import flag_path

    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    timer = ctx.Process(target=_time_exclusively, args=(path, ready, 60.0, stamps))
    timer.start()
    assert ready.wait(10)
    assert flag_path(path).read_bytes()[0] == 1                     # announced while it times
    os.kill(timer.pid, signal.SIGKILL)
    timer.join(10)
    section = TimingSection(path)
    with section.work():
        pass
    assert flag_path(path).read_bytes()[0] == 0                     # later steps take no locks again
    section.close()


def _time_unannounced(path, ready, stamps):
    from sparsebench import platform

    platform.flag_path = lambda p: Path(str(path) + ".elsewhere")     # a flag the worker never reads
    _time_once(path, ready, 0.1, stamps)


def test_a_timer_whose_flag_is_not_seen_still_gets_in_once_the_holder_idles(tmp_path, monkeypatch):
    """The safety net: a hold is let go after IDLE_RELEASE_S outside steps even with no flag seen."""
    from sparsebench import platform

    monkeypatch.setattr(platform, "IDLE_RELEASE_S", 0.3)
    path, ready, stamps = tmp_path / "timing", ctx.Event(), ctx.Array("d", [0.0, 0.0])
    section = TimingSection(path)
    with section.work():
        pass
    timer = ctx.Process(target=_time_unannounced, args=(path, ready, stamps))
    timer.start()
    assert ready.wait(10)
    timer.join(10)
    assert stamps[1] > 0
    section.close()

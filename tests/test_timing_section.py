"""The timing section (platform.TimingSection): timing waits for the steps in flight, and every
other process's work waits for the timing, however many steps it has queued; a dead holder frees it."""
import multiprocessing as mp
import os
import signal
import time

import pytest

from sparsebench.platform import TimingSection, timing_section, use_timing_section

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the other worker")
ctx = mp.get_context("fork") if hasattr(os, "fork") else None


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

"""The sweep's ETA comes from per-phase step costs, not from a rate over finished runs."""
import dataclasses
import io
import time

import pytest

from sparsebench.runners.progress import PlainProgress, SweepEta
from sparsebench.specs import Recipe, RunSpec, Target

from conftest import make_record


def spec(method, target=Target(), seed=0):
    return RunSpec(method=method, model="resnet20_tiny", dataset="digits", target=target, seed=seed,
                   recipe=Recipe(pretrain_epochs=10, finetune_epochs=2, search_epochs=1))


def ref(method, pretrain=(100, 10.0), method_cost=(0, 0.0), finetune=(0, 0.0)):
    r = make_record(method, 0, 0.9, target=None, kind="none")
    cost = dataclasses.replace(r.cost, dense_pretrain_steps=pretrain[0], dense_pretrain_wall_seconds=pretrain[1],
                               method_steps=method_cost[0], method_wall_seconds=method_cost[1],
                               finetune_steps=finetune[0], finetune_wall_seconds=finetune[1])
    return dataclasses.replace(r, model="resnet20_tiny", cost=cost)


def test_eta_counts_the_dense_pretrain_once_and_learns_from_finished_runs():
    specs = [spec("dense"), spec("magnitude-global", Target("sparsity", 0.5)),
             spec("magnitude-global", Target("sparsity", 0.9))]
    eta = SweepEta.plan(specs, reference=[ref("dense", pretrain=(100, 10.0))])
    assert eta.seconds_per_step("resnet20_tiny", "pretrain") == pytest.approx(0.1)
    steps = {p.spec.run_id: p.steps for p in eta.plans}
    pretrain = steps[specs[0].run_id]["pretrain"]
    fixed = eta.fixed["resnet20_tiny"]
    per_run = [eta.predicted(p) for p in eta.plans]
    # the pretrain is paid once, by the first run of the checkpoint
    assert eta.total() == pytest.approx(sum(per_run) + pretrain * 0.1)
    assert eta.remaining() == pytest.approx(eta.total())
    # this machine is 3x slower than the reference: its own numbers win
    slow = ref("dense", pretrain=(100, 30.0))
    eta.finish(specs[0], wall=30.0 + fixed, record=slow)
    assert eta.seconds_per_step("resnet20_tiny", "pretrain") == pytest.approx(0.3)
    assert specs[0].run_id in eta.finished and eta.remaining() == pytest.approx(
        sum(eta.predicted(p) for p in eta.plans[1:]))


def test_plain_progress_prints_periodic_lines_and_always_the_last():
    stream = io.StringIO()
    progress = PlainProgress(3, "quick", None, interval=3600, stream=stream)
    for what in ("a", "b", "c"):
        progress.update(what)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("[quick] 1/3 runs") and lines[-1].startswith("[quick] 3/3 runs")


def test_eta_with_workers_shares_the_training_and_learns_the_fixed_part_from_phases():
    specs = [spec("dense"), spec("magnitude-global", Target("sparsity", 0.5)),
             spec("magnitude-global", Target("sparsity", 0.9))]
    reference = [ref("dense", pretrain=(100, 10.0), finetune=(10, 1.0))]
    serial = SweepEta.plan(specs, reference=reference)
    two = SweepEta.plan(specs, reference=reference, workers=2)
    assert serial.total() / 2 < two.total() < serial.total()
    fixed = two.fixed["resnet20_tiny"]
    # one run's phases: training (not fixed), and latency, evaluation... (fixed)
    two.finish(specs[1], wall=99.0, record=ref("magnitude-global", finetune=(10, 1.0)),
               phases={"method": 0.1, "finetune": 1.0, "dense checkpoint": 0.2, "latency": 2.0, "evaluation": 0.5})
    assert two.fixed["resnet20_tiny"] == pytest.approx(0.5 * (fixed + 2.5))


def test_plain_progress_names_the_running_runs_and_prints_while_none_finishes(tmp_path):
    from sparsebench.training.watch import write_status

    class Where:
        stage, position, schedule_steps, budget = "method", 40, 100, None

    write_status(tmp_path / "run.json", "rigl resnet20_tiny sparsity=0.8", Where(), 2.0, None)
    stream = io.StringIO()
    progress = PlainProgress(3, "quick", None, interval=0.05, stream=stream, running=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not stream.getvalue() and time.monotonic() < deadline:     # no run finished: the ticker's line
            time.sleep(0.02)
    finally:
        progress.close()
    first = stream.getvalue().splitlines()[0]
    assert first.startswith("[quick] 0/3 runs") and first.endswith("; running: rigl resnet20_tiny sparsity=0.8: "
                                                                   "method 40/100, ETA 2m 00s")


def test_a_zero_interval_starts_no_ticker_and_a_short_one_never_spins(tmp_path):
    """`--progress-interval 0` printed every run and also started a thread that woke without pause,
    holding the GIL from the runs it reported on (a 6-run sweep took 12 minutes instead of 20 s)."""
    import io
    import time

    from sparsebench.runners.progress import PlainProgress

    every = PlainProgress(3, "t", None, interval=0.0, stream=io.StringIO(), running=tmp_path)
    assert every._ticker is None
    every.close()
    short = PlainProgress(3, "t", None, interval=0.01, stream=io.StringIO(), running=tmp_path)
    start = time.process_time()
    time.sleep(1.0)
    short.close()
    assert time.process_time() - start < 0.2          # the ticker slept, it did not spin

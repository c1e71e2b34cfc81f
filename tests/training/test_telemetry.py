"""The training curve every stage records, and the mechanism verdict methods build from telemetry."""
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsebench.methods.base import Method, judge_mechanism
from sparsebench.specs import Recipe
from sparsebench.training.telemetry import TrainingCurve
from sparsebench.training.trainer import StepBudget, Trainer, TrainerHook


def test_curve_bins_loss_keeps_validation_and_events():
    curve = TrainingCurve()
    for step in range(1, 251):
        curve.add_step(step, loss=float(step), lr=0.1)
    curve.add_val(100, 0.5)
    curve.add_event(50, "update", swapped=3)
    d = curve.as_dict(max_points=100)
    assert d["steps_per_point"] == 3 and len(d["step"]) == 84 and d["step"][:2] == [1, 4]
    assert d["loss"][0] == pytest.approx(2.0) and d["loss"][-1] == pytest.approx(250.0)   # bin means
    assert d["val"] == [[100, 0.5]] and d["events"] == [[50, "update", {"swapped": 3}]]
    assert curve.events_of("update") == [{"step": 50, "swapped": 3}]
    assert TrainingCurve().as_dict() is None


class Updates(TrainerHook):
    def after_step(self, trainer):
        if trainer.step % 3 == 0:
            trainer.event("update", at=trainer.step)


def test_trainers_of_one_stage_share_a_curve_on_the_budget_axis():
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=16)
    model, budget, curve = nn.Linear(4, 2), StepBudget(20), TrainingCurve()
    first = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[Updates()], budget=budget, curve=curve)
    first.fit(6, val_loader=loader, eval_every=3)
    second = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, budget=budget, curve=curve)
    second.fit(4)
    assert curve.steps == list(range(1, 11))                 # budget steps, across both trainers
    assert [s for s, _ in curve.val] == [3, 6] and [e[0] for e in curve.events] == [3, 6]
    assert all(lr > 0 for lr in curve.lr) and len(curve.loss) == 10


class Toy(Method):
    null_control = {"search": False}
    mechanism_thresholds = {"moved": 2, "correlation": ("<=", 0.9)}

    @dataclass(frozen=True)
    class Config:
        search: bool = True


@pytest.mark.parametrize("metrics, acted", [({"moved": 3, "correlation": 0.5}, True),
                                            ({"moved": 1, "correlation": 0.5}, False),
                                            ({"moved": 3, "correlation": 0.95}, False),
                                            ({"correlation": 0.5}, False)])
def test_the_verdict_needs_every_declared_threshold(metrics, acted):
    m = judge_mechanism(Toy(), metrics)
    assert m.acted is acted and m.declared and not m.control and m.label == ("acted" if acted else "did not act")
    assert m.thresholds == {"moved": [">=", 2], "correlation": ["<=", 0.9]}
    if not acted:
        assert m.reason.startswith("did not act:")


def test_a_null_control_is_marked_whatever_its_numbers():
    m = judge_mechanism(Toy(Toy.Config(search=False)), {"moved": 0, "correlation": 1.0})
    assert m.control and m.label == "control" and "search=False" in m.reason


def test_a_control_whose_numbers_pass_says_its_mechanism_leaked():
    m = judge_mechanism(Toy(Toy.Config(search=False)), {"moved": 5, "correlation": 0.1})
    assert m.control and m.acted and "was not switched off" in m.reason


def test_a_curve_stays_bounded_whatever_the_step_count():
    """SViTE on ImageNet: ~1.5 M steps in one stage. The curve keeps at most MAX_POINTS bins, each the
    mean of its steps with their range, and its checkpoint state stays small."""
    import io
    import math

    from sparsebench.report.curves import curve_svg

    curve, n = TrainingCurve(), 1_500_000
    for step in range(1, n + 1):
        curve.add_step(step, loss=(step % 7) * 0.5, lr=1.0 / step)
    buffer = io.BytesIO()
    torch.save(curve.state_dict(), buffer)                   # what every mid-fit checkpoint carries
    bins = len(curve.steps)
    assert bins <= 2048 and len(buffer.getvalue()) < 200_000, (bins, len(buffer.getvalue()))

    from sparsebench.training.telemetry import MAX_POINTS
    assert MAX_POINTS // 2 < bins <= MAX_POINTS and len(curve) == n and sum(curve.count) == n
    assert curve.width == 2 ** math.ceil(math.log2(n / MAX_POINTS))
    assert curve.steps[0] == 1 and curve.last_step[-1] == n                      # first and last steps kept
    assert all(c == curve.width for c in curve.count[:-1]) and 0 < curve.count[-1] <= curve.width
    assert all(curve.steps[i + 1] == curve.last_step[i] + 1 for i in range(bins - 1))   # contiguous ranges
    assert all(last - first + 1 == c for first, last, c in zip(curve.steps, curve.last_step, curve.count))
    mean = sum((s % 7) * 0.5 for s in range(1, n + 1)) / n
    assert sum(curve.loss_sum) / n == pytest.approx(mean, rel=1e-12)           # the mean preserved
    assert curve.loss[0] == pytest.approx(sum((s % 7) * 0.5 for s in range(1, curve.width + 1)) / curve.width)
    assert curve.lr[0] == 1.0 and curve.lr[1] == 1.0 / (curve.width + 1)      # the lr at each bin's first step

    record = curve.as_dict()                                 # the record's format, as the report reads it
    assert len(record["step"]) <= 100 and record["steps_per_point"] % curve.width == 0
    assert record["step"][0] == 1 and sum(record["loss"]) / len(record["loss"]) == pytest.approx(mean, rel=1e-3)
    assert "<svg" in curve_svg("method", record)

    resumed = TrainingCurve()
    resumed.load_state_dict(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True))
    assert resumed.state_dict() == curve.state_dict() and resumed.as_dict() == record


def test_a_curve_saved_before_bins_loads_binned():
    """A mid-fit checkpoint written with one entry per step (steps, loss, lr lists) still resumes."""
    old = {"steps": list(range(1, 5001)), "loss": [float(s % 3) for s in range(1, 5001)],
           "lr": [0.1] * 5000, "val": [[100, 0.5]], "events": [[50, "update", {"swapped": 3}]]}
    curve = TrainingCurve(max_points=1000)
    curve.load_state_dict(old)
    assert len(curve) == 5000 and len(curve.steps) <= 1000 and curve.width == 8
    assert sum(curve.loss_sum) == sum(old["loss"]) and curve.steps[0] == 1 and curve.last_step[-1] == 5000
    assert curve.val == [[100, 0.5]] and curve.events_of("update") == [{"step": 50, "swapped": 3}]
    assert curve.event_count("update") == 1


def test_events_beyond_the_kept_ones_are_counted():
    from sparsebench.training.telemetry import MAX_EVENTS

    curve = TrainingCurve()
    for step in range(MAX_EVENTS + 500):
        curve.add_event(step, "topology", moved=1)
    assert len(curve.events) == MAX_EVENTS and curve.event_count("topology") == MAX_EVENTS + 500
    record = curve.as_dict(max_events=200)
    assert len(record["events"]) == 200 and record["events_dropped"] == MAX_EVENTS + 300

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

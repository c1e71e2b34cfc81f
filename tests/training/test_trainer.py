import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsebench.specs import Recipe
from sparsebench.training.trainer import BudgetExceeded, StepBudget, Trainer, TrainerHook, evaluate


class Constant(nn.Module):
    """Predicts class 0 for the first `k` samples seen in a batch-independent way (by value)."""

    def forward(self, x):
        # x[:, 0] holds the label we want the "model" to predict
        return nn.functional.one_hot(x[:, 0].long(), 3).float()


def test_accuracy_is_sum_over_samples_not_mean_of_batches():
    # 5 samples, batch 4: batch means would be (3/4 + 0/1)/2 = 0.375; the sample mean is 3/5.
    preds = torch.tensor([0, 1, 2, 0, 1.0])[:, None]
    labels = torch.tensor([0, 1, 2, 1, 2])
    loader = DataLoader(TensorDataset(preds, labels), batch_size=4)
    acc = evaluate(Constant(), loader, torch.device("cpu"), num_classes=3)
    assert acc.n == 5 and acc.top1 == pytest.approx(3 / 5)


def _toy():
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    return nn.Linear(4, 2), DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                                       generator=torch.Generator().manual_seed(0))


def test_budget_is_enforced():
    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, budget=StepBudget(3))
    trainer.fit(3)
    with pytest.raises(BudgetExceeded):
        trainer.train_step()


def test_hooks_run_in_order_and_extra_loss_is_added():
    calls = []

    class Spy(TrainerHook):
        def extra_loss(self, trainer, inputs, outputs, targets):
            calls.append("loss")
            return 100.0 * outputs.pow(2).mean()

        def after_backward(self, trainer):
            calls.append("backward")
            assert trainer.model.weight.grad is not None

        def after_step(self, trainer):
            calls.append("step")

    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[Spy()])
    trainer.restart_schedule(1)
    loss = trainer.train_step()
    assert calls == ["loss", "backward", "step"]
    assert float(loss) > 1.0           # the extra term dominates a CE of ~0.7


def test_fit_selects_on_validation_and_restores_best_weights():
    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.5)
    result = trainer.fit(12, val_loader=loader, eval_every=3)
    assert len(result.history) == 4
    assert result.best_val_top1 == max(h["val_top1"] for h in result.history)
    assert evaluate(model, loader, torch.device("cpu"), 2).top1 == pytest.approx(result.best_val_top1)


def test_phases_continue_one_schedule_unless_restarted():
    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(warmup_fraction=0.0), torch.device("cpu"), 2, 1.0)
    trainer.restart_schedule(10)
    trainer.fit(5)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 10)))
    trainer.fit(4)                        # second phase: same horizon, LR keeps decaying
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.5 * (1 + math.cos(math.pi * 8 / 10)))
    trainer.restart_schedule(4)
    trainer.fit(1)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(1.0)


def test_eval_mode_keeps_batchnorm_statistics_frozen():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    _, loader = _toy()
    before = model[1].running_mean.clone()
    Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, model_mode="eval").fit(3)
    assert torch.equal(model[1].running_mean, before)
    Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1).fit(1)
    assert not torch.equal(model[1].running_mean, before)


def test_no_weight_decay_and_reset_optimizer():
    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(weight_decay=0.1), torch.device("cpu"), 2, 0.1,
                      no_weight_decay=[model.weight])
    decays = {id(p): g["weight_decay"] for g in trainer.optimizer.param_groups for p in g["params"]}
    assert decays[id(model.weight)] == 0.0
    trainer.fit(2)
    assert trainer.optimizer.state[model.weight]
    trainer.reset_optimizer()
    assert not trainer.optimizer.state


class _Recorder(TrainerHook):
    """Logs every call, so a test can read the order of one step."""

    def __init__(self, name, log, order=0):
        self.name, self.log, self.order = name, log, order

    def before_forward(self, trainer, inputs, targets):
        self.log.append(("before_forward", self.name))

    def compute_loss(self, trainer, inputs, outputs, targets, loss):
        self.log.append(("compute_loss", self.name))
        return loss

    def extra_loss(self, trainer, inputs, outputs, targets):
        self.log.append(("extra_loss", self.name))

    def after_backward(self, trainer):
        self.log.append(("after_backward", self.name))

    def after_step(self, trainer):
        self.log.append(("after_step", self.name))


def test_hook_order_within_a_step_is_pinned():
    from sparsebench.training.trainer import HookOrder

    model, loader = _toy()
    log = []
    hooks = [_Recorder("masks", log, HookOrder.MASKS), _Recorder("a", log), _Recorder("b", log),
             _Recorder("grad-reader", log, HookOrder.READS_DENSE_GRADIENTS)]
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=hooks)
    trainer.restart_schedule(1)
    trainer.train_step()
    per_hook = ["grad-reader", "a", "b", "masks"]          # ascending order, ties as given
    points = ["before_forward", "compute_loss", "extra_loss", "after_backward", "after_step"]
    assert log == [(p, h) for p in points for h in per_hook]


def test_dense_gradient_reader_runs_before_gradient_masking():
    from sparsebench.training.masks import MaskSet
    from sparsebench.training.trainer import HookOrder

    model, loader = _toy()
    mask = torch.ones_like(model.weight, dtype=torch.bool)
    mask[0, 0] = False
    masks = MaskSet(model, {"weight": mask})
    seen = {}

    class GradReader(TrainerHook):
        order = HookOrder.READS_DENSE_GRADIENTS

        def after_backward(self, trainer):
            seen["dense"] = model.weight.grad.clone()

    class LateReader(TrainerHook):
        order = HookOrder.MASKS + 1

        def after_backward(self, trainer):
            seen["masked"] = model.weight.grad.clone()

    # given in the "wrong" order: the trainer orders them
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[LateReader(), masks, GradReader()])
    trainer.restart_schedule(1)
    trainer.train_step()
    assert seen["dense"][0, 0] != 0 and seen["masked"][0, 0] == 0
    assert model.weight[0, 0] == 0


def test_before_forward_replaces_the_batch_and_compute_loss_wraps_the_loss():
    model, loader = _toy()

    class ZeroInputs(TrainerHook):
        def before_forward(self, trainer, inputs, targets):
            return torch.zeros_like(inputs), targets

    class Doubled(TrainerHook):
        def compute_loss(self, trainer, inputs, outputs, targets, loss):
            assert bool((inputs == 0).all())          # sees the replaced batch
            return 2 * loss

    x, y = next(iter(loader))
    with torch.no_grad():
        expected = 2 * nn.functional.cross_entropy(model(torch.zeros_like(x)), y)
    trainer = Trainer(model, loader, Recipe(label_smoothing=0.0), torch.device("cpu"), 2, 0.1,
                      hooks=[ZeroInputs(), Doubled()])
    trainer.restart_schedule(1)
    trainer._data = iter([(x, y)])
    loss = trainer.train_step()
    assert bool((trainer.batch[0] == 0).all())
    assert torch.isclose(loss, expected, atol=1e-6)


def test_non_finite_loss_stops_training_with_diverged():
    from sparsebench.errors import Diverged

    model, loader = _toy()
    with torch.no_grad():
        model.weight.fill_(float("nan"))
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1)
    with pytest.raises(Diverged, match="non-finite training loss"):
        trainer.fit(3)

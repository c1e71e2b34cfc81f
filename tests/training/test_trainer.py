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

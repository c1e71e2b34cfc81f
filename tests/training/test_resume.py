"""Kill-and-resume of fits, and the training-cost (MACs) count of the trainer."""
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from sparsebench.specs import Recipe
from sparsebench.training.masks import MaskSet, topk_mask
from sparsebench.training.resume import ResumeMismatch, RunCheckpoints
from sparsebench.training.trainer import StepBudget, Trainer, TrainerHook

from conftest import Killed, kill_after


class Noisy(TrainerHook):
    """A hook with state of its own (a generator and a history) that shapes training."""

    def __init__(self):
        self.generator, self.seen = torch.Generator().manual_seed(5), []

    def extra_loss(self, trainer, inputs, outputs, targets):
        self.seen.append(trainer.step)
        return 0.01 * torch.rand((), generator=self.generator) * outputs.pow(2).mean()

    def state_dict(self):
        return {"generator": self.generator.get_state(), "seen": list(self.seen)}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.seen = list(state["seen"])


def _run(directory, every=3):
    """Two fits with a deterministic prune in between, dropout and a shuffled loader: a small GaP."""
    torch.manual_seed(0)
    x, y = torch.randn(80, 6), torch.randint(0, 3, (80,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    masks = MaskSet(model, {"0.weight": torch.ones(16, 6, dtype=torch.bool)})
    noisy = Noisy()
    checkpoints = RunCheckpoints(directory, every) if directory is not None else None
    budget = StepBudget(100)
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 3, 0.1, hooks=[noisy, masks],
                      budget=budget, checkpoints=checkpoints)
    first = trainer.fit(7, val_loader=loader, eval_every=2)
    masks.update("0.weight", topk_mask(model[0].weight.abs(), 40), trainer.optimizer)   # the prune-back
    second = trainer.fit(8)
    return trainer, masks, noisy, budget, (first, second), checkpoints


def _same(a, b):
    ta, ma, na, ba, ra, _ = a
    tb, mb, nb, bb, rb, _ = b
    for k, v in ta.model.state_dict().items():
        assert torch.equal(v, tb.model.state_dict()[k]), k
    assert torch.equal(ma.masks["0.weight"], mb.masks["0.weight"])
    for p, q in zip(ta.model.parameters(), tb.model.parameters()):
        sa, sb = ta.optimizer.state[p], tb.optimizer.state[q]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert na.seen == nb.seen and ba.used == bb.used == 15 and ta.step == tb.step
    assert ta.compute.as_dict() == tb.compute.as_dict()
    assert ta.curve.state_dict() == tb.curve.state_dict() and len(ta.curve) == 15   # the curve survives a kill
    for x, y in zip(ra, rb):
        assert (x.steps, x.best_val_top1, x.best_step, x.history) == (y.steps, y.best_val_top1, y.best_step, y.history)


@pytest.mark.parametrize("kill_at", [5, 11])        # inside the first fit, inside the second
def test_a_killed_run_resumes_bitwise(tmp_path, monkeypatch, kill_at):
    reference = _run(None)
    after_reference = torch.rand(4)
    restore = kill_after(monkeypatch, kill_at)
    with pytest.raises(Killed):
        _run(tmp_path)
    restore()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["fit-0.pt"] if kill_at < 8 else ["fit-0.pt", "fit-1.pt"])
    resumed = _run(tmp_path)
    assert torch.equal(torch.rand(4), after_reference)            # global RNG where the reference left it
    _same(reference, resumed)
    assert resumed[-1].resumed == (1 if kill_at < 8 else 2)


def test_a_completed_fit_returns_its_saved_result_without_training(tmp_path, monkeypatch):
    reference = _run(tmp_path)
    restore = kill_after(monkeypatch, 1)      # any step taken would raise
    again = _run(tmp_path)
    restore()
    _same(reference, again)
    assert again[-1].resumed == 2


def test_a_checkpoint_of_other_code_is_refused(tmp_path):
    _run(tmp_path)
    torch.manual_seed(0)
    model = nn.Linear(6, 3)
    loader = DataLoader(TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,))), batch_size=16)
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 3, 0.1, checkpoints=RunCheckpoints(tmp_path))
    with pytest.raises(ResumeMismatch, match="delete"):
        trainer.fit(3)


# --- training cost ------------------------------------------------------------------------------
def _mlp_trainer(model, hooks=(), batch=16, **kwargs):
    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 10), torch.randint(0, 5, (64,))), batch_size=batch,
                        shuffle=True, generator=torch.Generator().manual_seed(0))
    return Trainer(model, loader, Recipe(), torch.device("cpu"), 5, 0.1, hooks=hooks, **kwargs)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(10, 20), nn.ReLU(), nn.Linear(20, 5))


DENSE_MACS = 10 * 20 + 20 * 5


def test_dense_training_costs_steps_times_batch_times_three_forwards():
    trainer = _mlp_trainer(_mlp())
    trainer.fit(3)
    assert trainer.compute.forward == 3 * 16 * DENSE_MACS
    assert trainer.compute.backward == 2 * trainer.compute.forward
    assert trainer.compute.forward + trainer.compute.backward == 3 * 16 * 3 * DENSE_MACS


def test_masked_training_counts_sparse_macs_exactly_and_follows_mask_updates():
    model = _mlp()
    g = torch.Generator().manual_seed(0)
    masks = MaskSet(model, {n: topk_mask(torch.rand(p.shape, generator=g), round(0.1 * p.numel()))
                            for n, p in model.named_parameters() if p.ndim == 2})
    assert masks.sparsity() == pytest.approx(0.9)
    trainer = _mlp_trainer(model, hooks=[masks])
    trainer.fit(2)
    sparse = sum(int(m.sum()) for m in masks.masks.values())       # nnz x 1 output position per linear
    assert sparse == 20 + 10
    assert trainer.compute.forward == 2 * 16 * sparse
    assert trainer.compute.backward == 2 * trainer.compute.forward
    version = masks.version
    masks.update("0.weight", torch.ones(20, 10, dtype=torch.bool))   # a grow: the cost follows
    assert masks.version > version
    assert trainer.forward_macs_per_image((10,)) == 200 + 10


def test_hooks_add_extra_macs_and_frozen_models_pay_activation_gradients_only():
    class Teacher(TrainerHook):
        def after_step(self, trainer):
            trainer.add_macs(forward=1000, backward=7)

    trainer = _mlp_trainer(_mlp(), hooks=[Teacher()])
    trainer.fit(2)
    assert trainer.compute.forward == 2 * 16 * DENSE_MACS + 2000
    assert trainer.compute.backward == 2 * 2 * 16 * DENSE_MACS + 14

    model = _mlp()
    for p in model.parameters():
        p.requires_grad_(False)
    prompt = nn.Parameter(torch.zeros(10))

    class Prompt(TrainerHook):
        def before_forward(self, trainer, inputs, targets):
            return inputs + prompt, targets

    trainer = _mlp_trainer(model, hooks=[Prompt()], train_model_params=False, param_groups=[{"params": [prompt]}])
    trainer.fit(2)
    assert trainer.compute.backward == trainer.compute.forward == 2 * 16 * DENSE_MACS

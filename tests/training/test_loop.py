"""How the loop feeds the device: uint8 batches normalised there, losses read every few steps,
channels_last and cudnn.benchmark on CUDA, evaluation under the training precision, torch.compile,
and micro-batches with gradient accumulation under a per-device batch limit."""
import functools

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchvision import transforms as T

from sparsebench.errors import Diverged
from sparsebench.specs import Recipe, RunSpec
from sparsebench.training.loading import DeviceLoader, batch_collate, device_loader, loader_kwargs
from sparsebench.training.trainer import (
    FINITE_CHECK_EVERY, StepBudget, Trainer, TrainerHook, evaluate, is_convnet, training_loop,
)

from conftest import requires_cuda

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class PILImages(Dataset):
    """Seeded random RGB images through a transform, as the image datasets serve them."""

    def __init__(self, transform, n=12, size=20):
        rng = np.random.default_rng(0)
        self.images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(n)]
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(self.images[i]), i % 3


def test_uint8_batches_are_normalised_on_the_device_bitwise_as_totensor_normalize():
    per_image = PILImages(T.Compose([T.CenterCrop(16), T.ToTensor(), T.Normalize(MEAN, STD)]))
    uint8 = PILImages(T.Compose([T.CenterCrop(16), T.PILToTensor()]))
    assert uint8[0][0].dtype == torch.uint8
    raw = next(iter(DataLoader(uint8, batch_size=12, **loader_kwargs("cpu"))))[0]
    assert raw.dtype == torch.uint8                       # what workers put in shared memory: a quarter of float32
    (expected, _), = DataLoader(per_image, batch_size=12)
    (got, labels), = device_loader(uint8, "cpu", MEAN, STD, batch_size=12)
    assert got.dtype == torch.float32 and torch.equal(got, expected)
    assert labels.dtype == torch.int64


def test_already_normalised_float_batches_pass_through():
    x = torch.randn(6, 3, 4, 4)
    (got, _), = device_loader(TensorDataset(x, torch.zeros(6, dtype=torch.long)), "cpu", MEAN, STD, batch_size=6)
    assert torch.equal(got, x)
    assert batch_collate([(x[0], 1), (x[1], 2)])[0].dtype == torch.float32


def test_loaders_pin_memory_for_cuda_and_keep_the_loader_interface(tmp_path, monkeypatch):
    from sparsebench.datasets import create_dataset
    from sparsebench.datasets.replicas import make_cifar10
    from sparsebench.runners.pipeline import make_loaders

    monkeypatch.setenv("SPARSEBENCH_ALLOW_PARTIAL_DATA", "1")
    make_cifar10(tmp_path, per_batch=8, n_test=6)
    data = create_dataset("cifar10", data_root=str(tmp_path), val_fraction=0.25)
    for device, pinned in (("cpu", False), ("cuda", True)):       # built, not iterated: no GPU needed
        loaders = make_loaders(data, 8, 0, device=device)
        for loader in loaders.values():
            assert isinstance(loader, DeviceLoader) and loader.loader.pin_memory is pinned
            assert loader.loader.collate_fn is batch_collate
    train = loaders["train_method"]
    assert train.generator is train.loader.generator and len(train) == len(train.loader)
    x, _ = next(iter(train.loader))
    assert x.dtype == torch.uint8


def test_hooks_see_normalised_float_inputs_from_uint8_data():
    seen = []

    class Look(TrainerHook):
        def before_forward(self, trainer, inputs, targets):
            seen.append(inputs)

    loader = device_loader(PILImages(T.Compose([T.CenterCrop(16), T.PILToTensor()])), "cpu", MEAN, STD,
                           batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))
    Trainer(model, loader, Recipe(), torch.device("cpu"), 3, 0.1, hooks=[Look()]).fit(2)
    assert len(seen) == 2 and all(x.dtype == torch.float32 for x in seen)
    assert float(seen[0].min()) < 0 < float(seen[0].max())


def _toy(batch=16):
    torch.manual_seed(0)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 2))
    return model, DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                             generator=torch.Generator().manual_seed(0))


class NanAt(TrainerHook):
    """Makes the loss of one step non-finite."""

    def __init__(self, step):
        self.step = step

    def compute_loss(self, trainer, inputs, outputs, targets, loss):
        return loss * float("nan") if trainer.step + 1 == self.step else loss


def test_losses_are_read_every_few_steps_and_a_nan_is_named_with_its_step():
    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[NanAt(7)])
    trainer.finite_check_every = 4
    trainer.restart_schedule(10)
    for _ in range(3):
        trainer.train_step()
    assert len(trainer.curve) == 0 and trainer.last_loss is None     # nothing read from the device yet
    trainer.train_step()
    assert len(trainer.curve) == 4 and trainer.last_loss == trainer.curve.loss[-1]
    trainer.train_step()
    trainer.train_step()
    with pytest.raises(Diverged, match=r"non-finite training loss \(nan\) at step 7, read at step 8"):
        trainer.train_step()
        trainer.train_step()
    assert trainer.curve.steps == [0, 1, 2, 3, 4, 5]                 # every finite step before it, in order


def test_on_cpu_every_step_is_read_and_on_cuda_every_few():
    model, loader = _toy()
    assert Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1).finite_check_every == 1
    assert Trainer(model, loader, Recipe(), torch.device("cuda"), 2, 0.1).finite_check_every == FINITE_CHECK_EVERY > 1


def test_a_step_failing_after_an_unread_nan_is_that_divergence():
    class TopKOfScores(TrainerHook):
        def after_step(self, trainer):          # a mask update that cannot work on NaN weights
            if not bool(torch.isfinite(trainer.model[0].weight).all()):
                raise RuntimeError("invalid scores")

    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[NanAt(2), TopKOfScores()])
    trainer.finite_check_every = 50
    with pytest.raises(Diverged, match="at step 2"):
        trainer.fit(5)


def test_fit_reads_the_last_losses_before_it_returns():
    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1)
    trainer.finite_check_every = 50
    trainer.fit(7)
    assert len(trainer.curve) == 7
    model, loader = _toy()
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[NanAt(7)])
    trainer.finite_check_every = 50
    with pytest.raises(Diverged, match="at step 7"):
        trainer.fit(7)


class AutocastSpy(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 2)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_autocast_enabled("cpu")))
        return self.linear(x)


def test_evaluation_runs_under_the_training_precision():
    _, loader = _toy()
    model = AutocastSpy()
    evaluate(model, loader, torch.device("cpu"), 2, precision="bf16")
    assert model.calls and all(autocast for _, autocast in model.calls)
    model.calls.clear()
    evaluate(model, loader, torch.device("cpu"), 2)
    assert not any(autocast for _, autocast in model.calls)
    model.calls.clear()
    Trainer(model, loader, Recipe(precision="bf16"), torch.device("cpu"), 2, 0.1).fit(2, loader, eval_every=2)
    evaluations = [autocast for training, autocast in model.calls if not training][-len(loader):]
    assert len(evaluations) == len(loader) and all(evaluations)      # (the MACs count before them runs eval too)


def test_channels_last_for_a_cnn_on_cuda_only_while_it_trains():
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    patchify = nn.Sequential(nn.Conv2d(3, 4, 4, stride=4), nn.Flatten())
    assert is_convnet(cnn) and not is_convnet(patchify)
    _, loader = _toy()
    trainer = Trainer(cnn, loader, Recipe(), torch.device("cuda"), 2, 0.1)      # built, not stepped: no GPU needed
    assert trainer.channels_last and cnn[0].weight.is_contiguous(memory_format=torch.channels_last)
    trainer.finish()
    assert cnn[0].weight.is_contiguous()
    assert not Trainer(cnn, loader, Recipe(), torch.device("cpu"), 2, 0.1).channels_last
    loop = training_loop(Recipe(batch_size=1024, device_batch=256), torch.device("cuda"), cnn)
    assert loop["cudnn_benchmark"] and loop["channels_last"] and loop["micro_batches"] == 4
    assert loop["loss_read_every"] == FINITE_CHECK_EVERY
    cpu = training_loop(Recipe(), torch.device("cpu"), cnn)
    assert not cpu["cudnn_benchmark"] and not cpu["channels_last"] and cpu["loss_read_every"] == 1


def test_compile_in_a_recipe_is_in_the_spec_and_trains_through_torch_compile(monkeypatch):
    plain = RunSpec("magnitude-global", "resnet20_tiny", "digits")
    assert "compile" not in plain.to_dict()["recipe"] and "device_batch" not in plain.to_dict()["recipe"]
    compiled = RunSpec("magnitude-global", "resnet20_tiny", "digits", recipe=Recipe(compile=True))
    assert compiled.to_dict()["recipe"]["compile"] is True and compiled.hash != plain.hash
    assert compiled.dense_key() != plain.dense_key()
    assert RunSpec.from_dict(compiled.to_dict()) == compiled
    # the real torch.compile (dynamo), with the eager backend: inductor takes a minute on a CPU
    traced = []

    def compile_eager(module, **kwargs):
        traced.append(module)
        return real_compile(module, backend="eager")

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", compile_eager)
    model, loader = _toy()
    reference, _ = _toy()
    trainer = Trainer(model, loader, Recipe(compile=True), torch.device("cpu"), 2, 0.1)
    assert traced == [model]
    trainer.fit(3)
    Trainer(reference, _toy()[1], Recipe(), torch.device("cpu"), 2, 0.1).fit(3)
    for a, b in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(a, b)


# --- micro-batches (gradient accumulation) ---------------------------------------------------
class Calls(TrainerHook):
    def __init__(self):
        self.before, self.backward, self.step, self.grads = [], 0, 0, []

    def before_forward(self, trainer, inputs, targets):
        self.before.append((trainer.micro_batch, len(targets)))

    def after_backward(self, trainer):
        self.backward += 1
        self.grads.append(trainer.model[0].weight.grad.clone())

    def after_step(self, trainer):
        self.step += 1


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_micro_batches_give_the_weights_of_the_whole_batch(optimizer):
    """Batch 8 in one pass vs as 4 micro-batches of 2: the same weights, steps and budget (no BatchNorm)."""
    results = []
    for device_batch in (None, 2):
        model, loader = _toy(batch=8)
        hook, budget = Calls(), StepBudget(10)
        recipe = Recipe(batch_size=8, device_batch=device_batch, optimizer=optimizer, weight_decay=0.01)
        trainer = Trainer(model, loader, recipe, torch.device("cpu"), 2, 0.1, hooks=[hook], budget=budget)
        fit = trainer.fit(5)
        results.append((model, hook, budget, fit, trainer))
    (whole, calls1, budget1, fit1, t1), (micro, calls4, budget4, fit4, t4) = results
    for a, b in zip(whole.parameters(), micro.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for g1, g4 in zip(calls1.grads, calls4.grads):           # after_backward sees the whole batch's gradient
        torch.testing.assert_close(g1, g4, rtol=1e-5, atol=1e-6)
    assert fit1.steps == fit4.steps == 5 and budget1.used == budget4.used == 5
    assert calls1.backward == calls4.backward == calls1.step == calls4.step == 5
    assert calls1.before == [(0, 8)] * 5 and calls4.before == [(0, 2), (1, 2), (2, 2), (3, 2)] * 5
    torch.testing.assert_close(torch.tensor(t1.curve.loss), torch.tensor(t4.curve.loss))
    assert t1.curve.lr == t4.curve.lr                        # the schedule counts optimizer steps
    assert t1.compute.forward == t4.compute.forward
    assert t4.batch[0].shape[0] == 8                         # the step's whole batch, as the hooks left it


def test_uneven_micro_batches_are_weighted_by_their_size():
    results = []
    for device_batch in (None, 3):                           # 8 = 3 + 3 + 2
        model, loader = _toy(batch=8)
        Trainer(model, loader, Recipe(batch_size=8, device_batch=device_batch), torch.device("cpu"), 2, 0.1).fit(3)
        results.append(model)
    for a, b in zip(*(m.parameters() for m in results)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert Recipe(batch_size=8, device_batch=3).micro_batches(8) == 3 and Recipe().micro_batches(64) == 1


def test_device_batch_is_in_the_spec_only_when_set():
    from sparsebench.errors import SpecError

    limited = RunSpec("magnitude-global", "resnet20_tiny", "digits", recipe=Recipe(device_batch=16))
    plain = RunSpec("magnitude-global", "resnet20_tiny", "digits")
    assert limited.to_dict()["recipe"]["device_batch"] == 16 and limited.hash != plain.hash
    assert limited.dense_key()["recipe"]["device_batch"] == 16       # BatchNorm sees micro-batches
    with pytest.raises(SpecError, match="device_batch"):
        Recipe(device_batch=0)


@requires_cuda
def test_cuda_loader_prefetches_on_a_side_stream_the_same_batches():
    dataset = PILImages(T.Compose([T.CenterCrop(16), T.PILToTensor()]), n=24)
    cpu = [x for x, _ in device_loader(dataset, "cpu", MEAN, STD, batch_size=4)]
    cuda = [x for x, _ in device_loader(dataset, "cuda", MEAN, STD, batch_size=4)]
    assert len(cpu) == len(cuda) == 6
    for a, b in zip(cpu, cuda):
        assert b.is_cuda
        torch.testing.assert_close(a, b.cpu())


def test_evaluation_counts_on_the_device_as_python_numbers_did():
    """Sums kept on the device (no sync per batch) give the numbers per-batch Python sums gave."""
    torch.manual_seed(0)
    x, y = torch.randn(103, 4), torch.randint(0, 12, (103,))
    model = nn.Linear(4, 12)
    loader = DataLoader(TensorDataset(x, y), batch_size=10)
    acc = evaluate(model, loader, torch.device("cpu"), 12, per_sample=True)
    loss_sum, correct5 = 0.0, 0
    with torch.no_grad():
        for xb, yb in loader:
            logits = model(xb)
            loss_sum += float(nn.functional.cross_entropy(logits, yb, reduction="sum"))
            correct5 += int((logits.topk(5, dim=1).indices == yb[:, None]).any(dim=1).sum())
        hits = model(x).argmax(1) == y
    assert acc.loss == loss_sum / 103 and acc.top5 == correct5 / 103
    assert torch.equal(acc.correct, hits) and acc.top1 == int(hits.sum()) / 103 and torch.equal(acc.labels, y)


@requires_cuda
def test_a_cnn_trains_on_cuda_in_channels_last_reading_its_loss_every_few_steps():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    loader = device_loader(TensorDataset(images, torch.randint(0, 3, (32,))), "cuda", MEAN, STD, batch_size=8,
                           shuffle=True, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 3)).cuda()
    trainer = Trainer(model, loader, Recipe(precision="bf16"), torch.device("cuda"), 3, 0.1)
    trainer.restart_schedule(10)
    trainer.train_step()
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last) and len(trainer.curve) == 0
    result = trainer.fit(6, loader, eval_every=6)
    assert len(trainer.curve) == 7 and result.best_val_top1 is not None
    assert model[0].weight.is_contiguous()                 # the default layout again once the fit ends

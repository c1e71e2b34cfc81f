"""Performance checks (pytest-benchmark): `pytest benchmarks/perf --benchmark-only`.

- harness training loop vs a bare PyTorch loop on the same tiny model, data and optimizer
  (goal: harness throughput ≥ 0.95 × bare);
- cost of FLOPs counting and of channel / head compaction on ResNet-50 and DeiT-Small.
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch
import torch.nn.functional as F

from sparsebench.specs import Recipe
from sparsebench.training.trainer import Trainer
from sparsebench.measure.flops import count_macs
from sparsebench.models import create_model

torch.set_num_threads(1)
STEPS = 30


def _setup():
    from sparsebench.datasets import create_dataset
    from sparsebench.runners.pipeline import make_loaders

    data = create_dataset("digits", img_size=16)
    loader = make_loaders(data, 64, 0)["train_method"]
    batches = [b for _, b in zip(range(STEPS), loader)]
    return batches


class ListLoader:
    """Pre-collated batches, so both loops time only the training step, not data loading."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def bare_loop(model, batches, lr):
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
                           {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}],
                          lr=lr, momentum=0.9, nesterov=True)
    model.train()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()


def harness_loop(model, batches, lr):
    Trainer(model, ListLoader(batches), Recipe(), torch.device("cpu"), 10, lr).fit(len(batches))


@pytest.mark.parametrize("loop", ["bare", "harness"])
def test_training_loop(benchmark, loop):
    batches = _setup()
    fn = bare_loop if loop == "bare" else harness_loop
    benchmark.pedantic(lambda: fn(create_model("resnet20_tiny", img_size=16), batches, 0.05), rounds=5,
                       warmup_rounds=1)


def test_harness_overhead_ratio():
    """Alternate the two loops so drift hits both; throughput ratio harness / bare ≥ 0.95."""
    batches = _setup()
    times = {"bare": [], "harness": []}
    for r in range(8):
        for name, fn in (("bare", bare_loop), ("harness", harness_loop))[:: 1 if r % 2 else -1]:
            torch.manual_seed(0)
            model = create_model("resnet20_tiny", img_size=16)
            start = time.perf_counter()
            fn(model, batches, 0.05)
            times[name].append(time.perf_counter() - start)
    ratio = statistics.median(times["bare"]) / statistics.median(times["harness"])
    print(f"harness/bare throughput ratio {ratio:.3f} "
          f"(bare {statistics.median(times['bare']) * 1e3 / STEPS:.2f} ms/step)")
    assert ratio >= 0.95


@pytest.mark.parametrize("name", ["resnet50", "deit_small"])
def test_flops_counting_cost(benchmark, name):
    model = create_model(name, num_classes=1000, img_size=224)
    report = benchmark.pedantic(lambda: count_macs(model, (3, 224, 224)), rounds=3)
    assert report.macs > 1e9


@pytest.mark.parametrize("name", ["resnet50", "deit_small"])
def test_compaction_cost(benchmark, name):
    from sparsebench.methods.baselines import unit_space

    model = create_model(name, num_classes=1000, img_size=224).eval()

    def prune_half():
        space = unit_space(model, (3, 224, 224), "coupled")
        kept = space.select([torch.rand(g.size, generator=torch.Generator().manual_seed(0)) for g in space.groups],
                            0.5)
        return space.macs([int(k.sum()) for k in kept]) / space.dense_macs, space.compact(model, kept)

    ratio, compact = benchmark.pedantic(prune_half, rounds=2)
    assert 0.49 <= ratio <= 0.5
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())


def test_ofb_search_step_cost():
    """OFB search step (bi-mask, one-hot + FLOPs loss, PMIM decoder) over a plain training step,
    vit_cifar_tiny on digits; alternating blocks, median. Reported, not asserted tightly."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
    from conftest import make_context
    from sparsebench.methods import create_method
    from sparsebench.methods.ofb import BiMaskSearch, PMIM
    from sparsebench.training.vit_widths import ViTWidthMasks

    method = create_method("ofb")
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=10_000)
    model = ctx.model
    plain = ctx.make_trainer()
    plain.restart_schedule(1000)
    masks = ViTWidthMasks(model)
    groups = method.build_groups(model, "cpu", torch.Generator().manual_seed(0))
    search = BiMaskSearch(model, masks, groups, method.config, 10_000, 0.0, ctx.input_size)
    search.target_macs = 0.5 * search.dense_macs
    search.after_step = lambda trainer: None          # keep every group open: the search's steady state
    pmim = PMIM(model, masks, method.config, 10_000, 16, torch.Generator().manual_seed(0))
    searching = ctx.make_trainer(hooks=[search, pmim], param_groups=[
        {"params": [g.S for g in groups] + [pmim.mask_token], "weight_decay": 0.0},
        {"params": [g.alpha for g in groups], "betas": (0.5, 0.999)},
        {"params": list(pmim.decoder.parameters())}])
    searching.restart_schedule(1000)

    def time_steps(trainer, on, n=10):
        pmim.enabled = on
        if not on:
            masks.clear()
        trainer.hooks = trainer.hooks if on else []
        start = time.perf_counter()
        for _ in range(n):
            trainer.train_step()
        return (time.perf_counter() - start) / n

    hooks = searching.hooks
    times = {"plain": [], "search": []}
    for r in range(6):
        for name in (("plain", "search") if r % 2 else ("search", "plain")):
            if name == "plain":
                times["plain"].append(time_steps(plain, False))
            else:
                searching.hooks = hooks
                times["search"].append(time_steps(searching, True))
    masks.remove()
    ratio = statistics.median(times["search"]) / statistics.median(times["plain"])
    print(f"ofb search step / plain step = {ratio:.2f} "
          f"(plain {statistics.median(times['plain']) * 1e3:.1f} ms, search {statistics.median(times['search']) * 1e3:.1f} ms)")
    assert ratio < 10

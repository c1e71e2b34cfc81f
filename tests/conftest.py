"""Shared tiny fixtures: small models, the embedded digits data, a seconds-scale recipe."""
from __future__ import annotations

import os
import textwrap

import pytest
import torch

from sparsebench.specs import DataSpec, MeasureSpec, Recipe, RunSpec, Target

torch.set_num_threads(1)

TINY_RECIPE = Recipe(batch_size=64, pretrain_epochs=1, finetune_epochs=1, search_epochs=0.5)
TINY_VIT_RECIPE = Recipe(batch_size=64, pretrain_epochs=1, finetune_epochs=1, search_epochs=0.5,
                         optimizer="adamw", lr=2e-3, finetune_lr=5e-4, weight_decay=0.05)
FAST_MEASURE = MeasureSpec(latency=True, batch_sizes=(1, 8), threads=1, min_run_time=0.01, rounds=2)


def tiny_spec(method="magnitude-global", model="resnet20_tiny", target="sparsity=0.5", seed=0, **kwargs) -> RunSpec:
    recipe = TINY_VIT_RECIPE if "vit" in model else TINY_RECIPE
    return RunSpec(method=method, model=model, dataset="digits", target=Target.parse(target), seed=seed,
                   recipe=kwargs.pop("recipe", recipe), data=DataSpec(img_size=16),
                   measure=kwargs.pop("measure", FAST_MEASURE), **kwargs)


@pytest.fixture
def cpu_model_factory():
    from sparsebench.models import create_model

    def make(name="resnet20_tiny", img_size=16, num_classes=10, **kw):
        torch.manual_seed(0)
        return create_model(name, num_classes=num_classes, img_size=img_size, **kw).eval()

    return make


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Non-trivial BN statistics and affine parameters, so equivalence tests can fail."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
    return model


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
os.environ.setdefault("PYTHONHASHSEED", "0")


def make_context(model_name="resnet20_tiny", target="sparsity=0.5", method=None, seed=0, budget=20, img_size=16):
    """A MethodContext on digits with a fresh model, as the harness would build it."""
    from sparsebench.datasets import create_dataset
    from sparsebench.runners.pipeline import make_loaders
    from sparsebench.training.trainer import StepBudget
    from sparsebench.methods import MethodContext
    from sparsebench.models import create_model

    data = create_dataset("digits", img_size=img_size)
    recipe = TINY_VIT_RECIPE if "vit" in model_name else TINY_RECIPE
    loaders = make_loaders(data, recipe.batch_size, seed)

    def make_model(**overrides):
        return create_model(model_name, num_classes=10, img_size=img_size, **overrides)

    torch.manual_seed(seed)
    model = make_model()
    from sparsebench.measure.flops import count_macs

    return MethodContext(
        model=model, model_name=model_name, make_model=make_model, train_loader=loaders["train_method"],
        val_loader=loaders["val"], num_classes=10, input_size=(3, img_size, img_size),
        target=Target.parse(target), budget=StepBudget(budget), recipe=recipe, device=torch.device("cpu"),
        seed=seed, config=method.config if method else None, dense_macs=count_macs(model, (3, img_size, img_size)).macs,
        data_info=data.info,
    )


def set_fused_attention(model: torch.nn.Module, flag: bool) -> None:
    for m in model.modules():
        if hasattr(m, "fused_attn"):
            m.fused_attn = flag


def make_record(method="random", seed=0, top1=0.8, target=0.5, kind="sparsity", realizable=False, speedup=None,
                status="ok", device="cpu", device_name="Test CPU", **overrides):
    """A valid RunRecord with made-up metrics, for report and store tests."""
    from sparsebench.store.record import Cost, Macs, Params, Prunable, Realization, RunRecord, target_check

    has_result = status in ("ok", "missed_target")
    kept = 1 - (target or 0)
    achieved_sparsity = (target or 0.0) if kind != "flops" else 0.0
    met, tolerance = target_check(kind, target, achieved_sparsity, kept)
    result = dict(
        achieved_sparsity=achieved_sparsity, achieved_sparsity_all_params=achieved_sparsity,
        achieved_flops_ratio=kept, test_top1=top1, test_top5=None, val_top1=top1, test_samples=100,
        params=Params(dense=1000, total=1000, nonzero=int(1000 * kept), prunable_tensors=3),
        macs=Macs(dense=1_000_000, realized=1_000_000, effective=int(1e6 * kept), attention=0, flops_dense=2_000_000,
                  flops_effective=int(2e6 * kept), input_size=[3, 16, 16], batch=1, convention="test",
                  effective_is="theoretical"),
        theoretical_speedup=1 / kept, measured_speedup=speedup, measured_speedup_batch=8 if speedup else None,
        realization=Realization(realizable, "compacted" if realizable else None, None, "float32"),
        latency=None if speedup is None else {      # as a run writes it: per batch, and the settings
            "8": {"batch_size": 8, "measured_speedup": speedup, "speedup_ci95": None, "dense_ms": 1.0,
                  "realized_ms": 1.0 / speedup},
            "settings": {"dtype": "float32", "threads": 1, "batch_sizes": [8]}},
        prunable=Prunable("input layer and classifier dense", ["conv1", "fc"], 3),
    ) if has_result else dict.fromkeys(
        ("achieved_sparsity", "achieved_sparsity_all_params", "achieved_flops_ratio", "test_top1", "test_top5",
         "val_top1", "test_samples", "params", "macs", "theoretical_speedup", "measured_speedup",
         "measured_speedup_batch", "realization", "latency", "prunable"))
    values = dict(
        run_id=f"{method}-{seed}-{target}-{device}", spec_hash=None, spec={"method_args": {}}, method=method,
        model="m", dataset="d", seed=seed, model_family="cnn", granularity="unstructured", starts_from="pretrained",
        target_kind=kind, target_value=target, status=status, target_met=status == "ok", tolerance=tolerance,
        dense_test_top1=0.9, dense_val_top1=0.9,
        cost=Cost(method_steps=0, method_budget_steps=0, method_wall_seconds=0.0, finetune_steps=0,
                  finetune_wall_seconds=0.0, dense_pretrain_steps=0, dense_pretrain_wall_seconds=0.0),
        selection={}, dense_checkpoint={}, data={}, structure=None, notes={},
        environment={"device": device, "device_name": device_name}, code_version={}, created="2025-01-01T00:00:00",
        error=None if has_result else "diverged in finetune: non-finite training loss (nan) at step 3",
        **result,
    )
    values.update(overrides)
    if values["spec_hash"] is None:          # one run, one spec: distinct runs get distinct hashes
        import hashlib

        values["spec_hash"] = hashlib.sha256(values["run_id"].encode()).hexdigest()
    return RunRecord(**values)
class Killed(Exception):
    """Stands for a SIGKILL in resume tests."""


def kill_after(monkeypatch, n):
    """Make the n-th optimizer step from now raise `Killed`; returns a function that undoes it."""
    from sparsebench.training.trainer import Trainer

    original, calls = Trainer.train_step, [0]

    def step(self):
        calls[0] += 1
        if calls[0] == n:
            raise Killed
        return original(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    return lambda: monkeypatch.setattr(Trainer, "train_step", original)


def two_run_suite(name: str, second_pretrain_epochs: float) -> str:
    """A sweep of two one-shot runs on resnet20_tiny whose dense checkpoints differ (their pretrain
    epochs), the second as long as a test needs it (e.g. long enough to be signalled or locked mid-way)."""
    return textwrap.dedent(f"""
        name: {name}
        methods:
          - {{name: magnitude-global, recipe: {{pretrain_epochs: 0.3}}}}
          - {{name: magnitude-layerwise, recipe: {{pretrain_epochs: {second_pretrain_epochs}}}}}
        models: [resnet20_tiny]
        datasets: [digits]
        targets: {{sparsity: [0.5]}}
        recipe: {{finetune_epochs: 0.2, search_epochs: 0.2}}
        data: {{img_size: 16}}
        measure: {{latency: false}}
    """)

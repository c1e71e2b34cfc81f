"""Shared tiny fixtures: small models, the embedded digits data, a seconds-scale recipe."""
from __future__ import annotations

import os

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

"""One run of the protocol, the same for every method:

1. the dense checkpoint for (model, dataset, seed) is trained once and cached;
2. the method runs within its step budget (pretrained start: the search budget;
   scratch start: the dense-pretrain budget, so nobody gets free epochs);
3. the identical fine-tune recipe, masks held, selects on the validation split;
4. the test split is evaluated once;
5. params, MACs (dense and sparsity-aware), realization and latency are measured;
6. one record is written atomically, named by the spec hash.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn
from torch.utils.data import DataLoader

from sparsebench.datasets import create_dataset
from sparsebench.datasets.integrity import screen
from sparsebench.runners.checkpoints import dense_checkpoint, load_dense_weights
from sparsebench.specs import RunSpec, SpecError
from sparsebench.training.trainer import StepBudget, Trainer, evaluate
from sparsebench.measure.environment import code_version, environment
from sparsebench.measure.flops import count_macs, count_params
from sparsebench.measure.latency import LatencySettings, compare_latency
from sparsebench.measure.realize import realize
from sparsebench.methods import METHODS, MethodContext, build_config, config_dict
from sparsebench.models import MODELS, create_model, model_family
from sparsebench.store.records import SCHEMA_VERSION, RecordStore

EVAL_BATCH = 256


@dataclass
class RunOptions:
    out: Path
    data_root: Optional[str] = None
    download: bool = False
    cache_dir: Optional[Path] = None       # dense checkpoints; default <out>/checkpoints
    device: str = "cpu"
    progress: Optional[Callable] = None    # tqdm-like factory, or None for silence
    max_bad_samples: int = 0               # image files that fail to decode: skipped and counted up to this


def validate(spec: RunSpec):
    """Check names, target kind and method args before any work; returns (method, config)."""
    from sparsebench.datasets import DATASETS

    method_cls = METHODS.get(spec.method).factory
    MODELS.get(spec.model)
    DATASETS.get(spec.dataset)
    config = build_config(method_cls, dict(spec.method_args))
    method = method_cls(config)
    if spec.target.kind != method.target_kind:
        wanted = {"sparsity": "--target sparsity=S", "flops": "--target flops=F", "none": "no target"}
        raise SpecError(f"method {spec.method!r} ({method.granularity}) takes {wanted[method.target_kind]}, "
                        f"got target {spec.target}")
    return method


def resolve(spec: RunSpec) -> RunSpec:
    """The spec with the method's full config (defaults included), so the hash names everything."""
    return _with_full_config(spec, validate(spec))


def _with_full_config(spec: RunSpec, method) -> RunSpec:
    return dataclasses.replace(spec, method_args=tuple(sorted(config_dict(method.config).items())))


PHASES = ("dense", "method", "finetune")


def make_loaders(data, batch_size: int, seed: int, workers: int = 0) -> dict:
    """Train loaders per phase, plus val and test.

    Each phase has its own generator, seeded from (seed, phase), so the data order of one
    phase never depends on how many batches another consumed. Runs with the same seed see
    the same order across methods, and a cached dense checkpoint changes nothing downstream.
    """
    if len(data.train) < batch_size:
        raise SpecError(f"batch_size={batch_size} is larger than the training split ({len(data.train)} samples); "
                        f"allowed: batch_size <= {len(data.train)}")
    extra = {"num_workers": workers, "persistent_workers": workers > 0}
    loaders = {
        f"train_{phase}": DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=True,
                                     generator=torch.Generator().manual_seed(seed * len(PHASES) + i), **extra)
        for i, phase in enumerate(PHASES)
    }
    loaders["val"] = DataLoader(data.val, batch_size=EVAL_BATCH, **extra)
    loaders["test"] = DataLoader(data.test, batch_size=EVAL_BATCH, **extra)
    return loaders


def _sparsity(model: nn.Module, dense: nn.Module, prunable: list) -> tuple:
    """(over the prunable set, over all params): removed or zeroed weights / dense count."""
    params = dict(model.named_parameters())
    dense_params = dict(dense.named_parameters())
    total = sum(dense_params[n].numel() for n in prunable)
    nnz = sum(int((params[n] != 0).sum()) for n in prunable if n in params)
    all_total = sum(p.numel() for p in dense.parameters())
    all_nnz = count_params(model)["params_nonzero"]
    return 1.0 - nnz / total, 1.0 - all_nnz / all_total


def execute(spec: RunSpec, options: RunOptions) -> dict:
    """Run one spec end to end and write its record; returns the record."""
    method = validate(spec)
    spec = _with_full_config(spec, method)
    store = RecordStore(options.out)
    device = torch.device(options.device)
    torch.set_num_threads(spec.measure.threads)
    progress = options.progress

    data = create_dataset(spec.dataset, options.data_root, spec.data.img_size, spec.data.val_fraction,
                          spec.data.split_seed, options.download)
    data = screen(data, options.max_bad_samples, progress, Path(options.out) / "data-checks")
    info = data.info
    input_size = (info.in_chans, info.img_size, info.img_size)
    loaders = make_loaders(data, spec.recipe.batch_size, spec.seed, spec.data.workers)
    n_train = data.split["n_train"]
    steps_per_epoch = math.ceil(n_train / spec.recipe.batch_size)
    eval_every = max(1, int(steps_per_epoch / spec.recipe.evals_per_epoch))
    recipe = spec.recipe
    pretrain_steps = recipe.steps(recipe.pretrain_epochs, n_train)
    finetune_steps = recipe.steps(recipe.finetune_epochs, n_train)
    search_steps = recipe.steps(recipe.search_epochs, n_train)
    model_kwargs = dict(num_classes=info.num_classes, img_size=info.img_size, in_chans=info.in_chans,
                        **dict(spec.model_args))

    def make_model(**overrides) -> nn.Module:
        return create_model(spec.model, **{**model_kwargs, **overrides}).to(device)

    family = model_family(spec.model)
    dense = make_model()
    if not method.supports(dense, family):
        raise SpecError(f"method {spec.method!r} does not support model {spec.model!r} ({family})")

    cache = Path(options.cache_dir) if options.cache_dir else Path(options.out) / "checkpoints"
    ckpt = dense_checkpoint(spec, cache, make_model, loaders, info.num_classes, device, pretrain_steps,
                            eval_every, progress)
    load_dense_weights(dense, ckpt)
    dense.eval()
    dense_macs = count_macs(dense, input_size)
    dense_params = count_params(dense)

    if method.starts_from == "pretrained":
        start_model, budget = copy.deepcopy(dense), search_steps
    else:
        torch.manual_seed(spec.seed)
        start_model, budget = make_model(), pretrain_steps
    ctx = MethodContext(
        model=start_model, model_name=spec.model, make_model=make_model,
        train_loader=loaders["train_method"], val_loader=loaders["val"], num_classes=info.num_classes,
        input_size=input_size, target=spec.target, budget=StepBudget(budget), recipe=recipe,
        device=device, seed=spec.seed, config=method.config, progress=progress, dense_macs=dense_macs.macs,
    )
    torch.manual_seed(spec.seed)
    start = time.perf_counter()
    outcome = method.run(ctx)
    method_wall = time.perf_counter() - start

    finetune = {"steps": 0, "wall_seconds": 0.0, "best_val_top1": None, "best_step": None}
    model = outcome.model
    if outcome.finetune and finetune_steps > 0:
        torch.manual_seed(spec.seed)
        hooks = [outcome.masks] if outcome.masks is not None else []
        trainer = Trainer(model, loaders["train_finetune"], recipe, device, info.num_classes, recipe.finetune_lr,
                          hooks)
        result = trainer.fit(finetune_steps, loaders["val"], eval_every, progress=progress, desc="finetune")
        finetune = {"steps": result.steps, "wall_seconds": result.wall_seconds,
                    "best_val_top1": result.best_val_top1, "best_step": result.best_step}
    if outcome.masks is not None:
        outcome.masks.apply()
    model.eval()
    val = evaluate(model, loaders["val"], device, info.num_classes)
    test = evaluate(model, loaders["test"], device, info.num_classes)     # the one test evaluation

    macs = count_macs(model, input_size)
    params = count_params(model)
    prunable = outcome.prunable or [n for n, p in dense.named_parameters() if p.ndim > 1]
    sparsity, sparsity_all = _sparsity(model, dense, prunable)
    realization = realize(model, outcome.realization, device, spec.measure.dtype)
    latency = None
    if spec.measure.latency and realization.realizable:
        m = spec.measure
        settings = LatencySettings(batch_sizes=m.batch_sizes, threads=m.threads, min_run_time=m.min_run_time,
                                   rounds=m.rounds, dtype=realization.dtype, channels_last=m.channels_last,
                                   compile=m.compile)
        latency = compare_latency(dense, realization.model, input_size, settings, device)
        latency["settings"] = {"dtype": realization.dtype, "threads": m.threads, "batch_sizes": list(m.batch_sizes),
                               "channels_last": m.channels_last, "compile": m.compile, "device": str(device),
                               "protocol": "alternating blocks, median; CPU torch.utils.benchmark, CUDA events"}
    throughput_batch = str(max(spec.measure.batch_sizes))
    measured = latency[throughput_batch]["measured_speedup"] if latency else None

    record = {
        "schema": SCHEMA_VERSION,
        "run_id": spec.run_id,
        "spec_hash": spec.hash,
        "spec": spec.to_dict(),
        "method": spec.method, "model": spec.model, "dataset": spec.dataset, "seed": spec.seed,
        "model_family": family,
        "granularity": method.granularity, "starts_from": method.starts_from,
        "target": {"kind": spec.target.kind, "value": spec.target.value},
        "achieved_sparsity": sparsity,
        "achieved_sparsity_all_params": sparsity_all,
        "achieved_flops_ratio": macs.macs_effective / dense_macs.macs,
        "test_top1": test.top1, "test_top5": test.top5, "val_top1": val.top1, "test_samples": test.n,
        "dense_test_top1": ckpt.test_top1, "dense_val_top1": ckpt.val_top1,
        "params": {"dense": dense_params["params"], "total": params["params"], "nonzero": params["params_nonzero"],
                   "prunable_tensors": len(prunable)},
        "macs": {"dense": dense_macs.macs, "realized": macs.macs, "effective": macs.macs_effective,
                 "attention": macs.attention_macs, "flops_dense": dense_macs.flops,
                 "flops_effective": macs.flops_effective, "input_size": list(input_size), "batch": 1,
                 "convention": "torch FlopCounterMode, fused attention off, MACs = FLOPs / 2, element-wise excluded",
                 "effective_is": "theoretical" if outcome.realization == "masked" else "realized"},
        "theoretical_speedup": dense_macs.macs / max(1, macs.macs_effective),
        "measured_speedup": measured,
        "measured_speedup_batch": int(throughput_batch) if latency else None,
        "realization": realization.as_dict(),
        "latency": latency,
        "cost": {"method_steps": ctx.budget.used, "method_budget_steps": budget,
                 "method_wall_seconds": method_wall, "finetune_steps": finetune["steps"],
                 "finetune_wall_seconds": finetune["wall_seconds"], "dense_pretrain_steps": ckpt.steps,
                 "dense_pretrain_wall_seconds": ckpt.wall_seconds},
        "selection": {"split": "val", "finetune_best_val_top1": finetune["best_val_top1"],
                      "finetune_best_step": finetune["best_step"], "test_evaluations": 1},
        "dense_checkpoint": {"hash": ckpt.hash, "file": ckpt.path.name, "val_top1": ckpt.val_top1,
                             "test_top1": ckpt.test_top1, "pretrained_sha256": ckpt.pretrained_sha256},
        "data": {**data.split, "img_size": info.img_size, "num_classes": info.num_classes,
                 "steps_per_epoch": steps_per_epoch, "source": info.source},
        "structure": outcome.structure,
        "notes": outcome.notes,
        "environment": environment(device, spec.measure.threads),
        "code_version": code_version(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    store.write(record)
    return record

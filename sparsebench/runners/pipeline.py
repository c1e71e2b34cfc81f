"""One run of the protocol, the same for every method, as a sequence of named stages:

    data_stage         splits and loaders; step counts of every phase
    dense_stage        the dense checkpoint for (model, dataset, seed), trained once and cached
    method_stage       the method within its step budget (pretrained start: the search budget;
                       scratch start: the dense-pretrain budget, so nobody gets free epochs;
                       × `Method.budget_scale` for extended-training settings such as RigL 2×)
    finetune_stage     the identical fine-tune recipe, masks held, selecting on validation
    evaluation_stage   validation and the one test evaluation
    measurement_stage  params, MACs (dense and sparsity-aware), prunable set, realization, latency
    record_stage       the typed `RunRecord`: target check and status

`execute` runs them in order and writes the record atomically, named by the spec hash.
A run whose training diverges (non-finite loss or weights) stops after that stage and is
still recorded, with status "diverged" and no metrics.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import math
import socket
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler

from sparsebench.datasets import create_dataset
from sparsebench.datasets.base import DatasetInfo
from sparsebench.errors import Diverged
from sparsebench.platform import any_rank, current as current_platform, timing_section, use_timing_section
from sparsebench.runners.checkpoints import DenseCheckpoint, dense_checkpoint, load_dense_weights
from sparsebench.runners.loaders import RankRunLoader, RunLoader, RunLoaders, loader_arguments, prefetch_plan
from sparsebench.datasets.integrity import screen
from sparsebench.specs import RunSpec, SpecError
from sparsebench.training.loading import EVAL_BATCH, DeviceLoader, loader_kwargs
from sparsebench.training.rank_data import RankShard
from sparsebench.training.resume import RunCheckpoints
from sparsebench.training.watch import RunWatch, flat_params, make_trackers, use_watch
from sparsebench.training.trainer import (
    COST_CONVENTION, Accuracy, StepBudget, Trainer, cudnn_benchmark, evaluate, non_finite_tensors, training_loop,
)
from sparsebench.measure.environment import code_version, environment
from sparsebench.measure.flops import MacsReport, count_macs, count_params
from sparsebench.measure.latency import LatencySettings
from sparsebench.measure.realize import compare_realized, realize
from sparsebench.measure.unstructured import Calibration
from sparsebench.methods import METHODS, NO_MECHANISM, Method, MethodContext, Outcome, build_config, config_dict
from sparsebench.methods.base import sanity_of
from sparsebench.training.sanity import reinitialise
from sparsebench.models import MODELS, ModelCard, create_model, model_card
from sparsebench.store.record import (
    Cost, Macs, Mechanism, Params, PerSample, Prunable, Realization, RunRecord, plain, target_check,
)
from sparsebench.store.records import RecordStore

LOCK_TIMEOUT_S = 24 * 3600.0      # generous: another sweep may be training a large dense checkpoint


class StageError(RuntimeError):
    """A stage failed for a reason that is not bad input; the message names stage and method."""


class PhaseTimes(dict):
    """Seconds a run spent per phase, `{phase: seconds}`: `with times("evaluation"): ...` adds to it.
    A sweep sums them over its runs (the per-run overhead breakdown of its summary)."""

    @contextlib.contextmanager
    def __call__(self, phase: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self[phase] = self.get(phase, 0.0) + time.perf_counter() - start


# The phases of a run that are training (found, waited for or trained: the dense checkpoint); the others
# are the per-run overhead a sweep's summary breaks down.
TRAINING_PHASES = ("dense checkpoint", "method", "finetune")


class _NoTimes(PhaseTimes):
    def __call__(self, phase: str):
        return contextlib.nullcontext()


NO_TIMES = _NoTimes()          # where nobody asked for the breakdown


@dataclass
class RunOptions:
    out: Path
    data_root: Optional[str] = None
    download: bool = False
    cache_dir: Optional[Path] = None       # dense checkpoints; default <out>/checkpoints
    device: str = "cpu"
    progress: Optional[Callable] = None    # tqdm-like factory, or None for silence
    # Resume (not in the spec hash: it does not change results). Every fit saves at its end and every
    # `checkpoint_every` steps under <out>/partial/<spec hash>/; a rerun of a killed run continues there.
    checkpoint_every: Optional[int] = 1000
    resume: bool = True                    # False: no checkpoints, a rerun starts over
    max_bad_samples: int = 0               # image files that fail to decode: skipped and counted up to this
    # The dense checkpoint's lock: given up (LockTimeout) after `lock_timeout` s. With `lock_patience`
    # (a sweep) a run waits that long, silently, then hands back so its launcher runs others meanwhile.
    lock_timeout: Optional[float] = LOCK_TIMEOUT_S
    lock_patience: Optional[float] = None
    # the final model as OUT/models/<run_id>.safetensors, named in the record (not in the spec hash)
    save_model: bool = False
    # Latency timed in the store's timing section: other runs into `out` on this host pause meanwhile.
    exclusive_timing: bool = True
    # Live curves (training/watch.py): "tensorboard" (OUT/tb/<run_id>/), "mlflow" (TensorBoard as well,
    # and an MLflow run at `tracker_uri`, default OUT/mlflow.db), or "none"
    tracker: str = "tensorboard"
    tracker_uri: Optional[str] = None
    # seconds between plain progress lines on stderr (stage, step, ETA, last val) where no bar shows them
    progress_every: Optional[float] = None


def lock_wait(options: RunOptions) -> dict:
    """How a run waits for the dense checkpoint's lock (`file_lock` arguments)."""
    if options.lock_patience is not None:
        return {"timeout": options.lock_patience, "notice_after": None}
    return {"timeout": options.lock_timeout}


def validate(spec: RunSpec) -> Method:
    """Check names, target kind and method args before any work; returns the configured method."""
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
    """The spec with the method's full config (defaults included) and, for a plugin, its
    distribution, version and source hash, so the hash names everything that decides the run."""
    return _with_full_config(spec, validate(spec))


def _with_full_config(spec: RunSpec, method) -> RunSpec:
    origin = METHODS.get(spec.method).origin
    return dataclasses.replace(spec, method_args=tuple(sorted(config_dict(method.config).items())),
                               plugin=tuple(sorted(origin.items())) if origin else ())


PHASES = ("dense", "method", "finetune")


def make_loaders(data, batch_size: int, seed: int, workers: int = 0, device="cpu") -> RunLoaders:
    """Train loaders per phase, plus val and test, each a `DeviceLoader`: uint8 batches collated by
    the workers, pinned and copied ahead on CUDA, normalised on `device` (`training/loading.py`).

    Each phase has its own generator, seeded from (seed, phase), so the data order of one
    phase never depends on how many batches another consumed. Runs with the same seed see
    the same order across methods, and a cached dense checkpoint changes nothing downstream.
    With workers, only the loaders in use hold worker processes (`runners/loaders.py`): one train
    loader at a time and the val loader, persistent within a stage; the test loader's end with its
    pass; and their prefetching is bounded by /dev/shm (`prefetch_plan`, recorded as `data.loader`).
    Under torchrun each rank takes its slice of every global batch (`RankSlices`) with its own
    augmentation randomness (`RankAugmentedLoader`) and evaluates its share of the val and test
    splits (`RankShard`).
    """
    if len(data.train) < batch_size:
        raise SpecError(f"batch_size={batch_size} is larger than the training split ({len(data.train)} samples); "
                        f"allowed: batch_size <= {len(data.train)}")
    platform = current_platform()
    if platform.world_size > 1 and batch_size % platform.world_size:
        raise SpecError(f"batch_size={batch_size} does not split over {platform.world_size} processes; "
                        f"allowed: a multiple of {platform.world_size}")
    plan = prefetch_plan(data.train, batch_size, EVAL_BATCH, workers, platform.world_size) if workers > 0 else None
    loaders = RunLoaders(plan=plan)
    pinned = loader_kwargs(device)            # uint8 collation; pinned memory on CUDA
    persistent = {**loader_arguments(plan, persistent=True), **pinned}
    for i, phase in enumerate(PHASES):
        generator = torch.Generator().manual_seed(seed * len(PHASES) + i)
        if platform.world_size == 1:
            loaders[f"train_{phase}"] = RunLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=True,
                                                  generator=generator, group=loaders, train=True, **persistent)
        else:       # the single-process order, each global batch split over the ranks
            batches = RankSlices(BatchSampler(RandomSampler(data.train, generator=generator), batch_size, True),
                                 platform.rank, platform.world_size)
            loaders[f"train_{phase}"] = RankRunLoader(data.train, batch_sampler=batches, generator=generator,
                                                      group=loaders, train=True, rank=platform.rank, **persistent)
    for split, persists in (("val", True), ("test", False)):   # under torchrun each rank evaluates its share
        samples = getattr(data, split)
        shard = RankShard(len(samples), platform.rank, platform.world_size) if platform.world_size > 1 else None
        loaders[split] = RunLoader(samples, batch_size=EVAL_BATCH, sampler=shard, group=loaders, train=False,
                                   **loader_arguments(plan, persistent=persists), **pinned)
    for name, loader in loaders.items():
        loaders[name] = DeviceLoader(loader, device, data.info.mean, data.info.std)
    return loaders


class RankSlices:
    """Under torchrun: every global batch of the single-process order, rank `r` taking `batch[r::n]`.

    The permutation comes from the same seeded generator as one process's loader, so the ranks
    together see exactly the batches a single process would, with the same effective batch size;
    DDP's mean of the ranks' mean gradients is the single-process gradient (up to summation order),
    except through batch statistics (BatchNorm normalises each rank's `batch_size / n` samples).
    """

    def __init__(self, batches: BatchSampler, rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        for batch in self.batches:
            yield batch[self.rank::self.world_size]

    def __len__(self) -> int:
        return len(self.batches)


# --- data -------------------------------------------------------------------------------------
@dataclass
class DataStage:
    info: DatasetInfo
    split: dict                      # sizes and seed of the train / val / test split
    loaders: RunLoaders              # train_<phase>, val, test (`make_loaders`)
    input_size: tuple                # (C, H, W)
    steps_per_epoch: int
    eval_every: int
    pretrain_steps: int
    finetune_steps: int
    search_steps: int


def data_stage(spec: RunSpec, options: RunOptions) -> DataStage:
    data = create_dataset(spec.dataset, options.data_root, spec.data.img_size, spec.data.val_fraction,
                          spec.data.split_seed, options.download)
    # files checked before any training (metadata, a decoded sample, or the cached verdict of
    # `check-data --full`): bad files are an error now, or skipped and counted
    data = screen(data, options.max_bad_samples, options.progress)
    info, recipe = data.info, spec.recipe
    n_train = data.split["n_train"]
    steps_per_epoch = math.ceil(n_train / recipe.batch_size)
    if recipe.evals_per_epoch > steps_per_epoch:     # one check per step is the most there can be
        raise SpecError(f"recipe evals_per_epoch={recipe.evals_per_epoch:g} is more than the {steps_per_epoch} steps "
                        f"of an epoch of {spec.dataset} at batch {recipe.batch_size}; allowed: "
                        f"0 < evals_per_epoch <= {steps_per_epoch}")
    return DataStage(
        info=info, split=dict(data.split),
        loaders=make_loaders(data, recipe.batch_size, spec.seed, spec.data.workers, options.device),
        input_size=(info.in_chans, info.img_size, info.img_size), steps_per_epoch=steps_per_epoch,
        # whole steps between checks (the record's selection.eval_every): 19 steps at 3 per epoch check every 6
        eval_every=max(1, int(steps_per_epoch / recipe.evals_per_epoch)),
        pretrain_steps=recipe.steps(recipe.pretrain_epochs, n_train),
        finetune_steps=recipe.steps(recipe.finetune_epochs, n_train),
        search_steps=recipe.steps(recipe.search_epochs, n_train),
    )


def model_factory(spec: RunSpec, info: DatasetInfo, device: torch.device) -> Callable[..., nn.Module]:
    """Fresh models of the spec's architecture for this data: make_model(**overrides)."""
    kwargs = dict(num_classes=info.num_classes, img_size=info.img_size, in_chans=info.in_chans, **dict(spec.model_args))

    def make_model(**overrides) -> nn.Module:
        return create_model(spec.model, **{**kwargs, **overrides}).to(device)

    return make_model


# --- dense checkpoint -------------------------------------------------------------------------
@dataclass
class DenseStage:
    model: nn.Module                 # the dense checkpoint's weights, in eval mode
    checkpoint: DenseCheckpoint
    macs: MacsReport
    params: dict


def dense_stage(spec: RunSpec, data: DataStage, make_model, device: torch.device, cache_dir: Path,
                progress=None, checkpoint_every: Optional[int] = None, resume: bool = True,
                lock: Optional[dict] = None, times: PhaseTimes = NO_TIMES) -> DenseStage:
    with times("dense checkpoint"):         # found in the cache, waited for, or trained now
        try:
            ckpt = dense_checkpoint(spec, cache_dir, make_model, data.loaders, data.info.num_classes, device,
                                    data.pretrain_steps, data.eval_every, progress, checkpoint_every, resume, lock)
        finally:
            data.loaders.release()
    with times("dense load"):
        dense = make_model()
        load_dense_weights(dense, ckpt)
        dense.eval()
    with times("FLOPs counting"):
        macs = count_macs(dense, data.input_size)
    with times("params"):
        params = count_params(dense)
    return DenseStage(dense, ckpt, macs, params)


# --- method -----------------------------------------------------------------------------------
@dataclass
class MethodStage:
    outcome: Optional[Outcome]       # None when the method diverged
    budget: int                      # steps it was allowed
    steps: int                       # steps it spent
    wall_seconds: float
    diverged: Optional[Diverged] = None
    train_macs: Optional[dict] = None  # forward/backward MACs the method's trainers spent
    curve: Optional[dict] = None       # the method's training curve (TrainingCurve.as_dict)


def method_stage(spec: RunSpec, method: Method, data: DataStage, dense: DenseStage, make_model,
                 device: torch.device, progress=None, checkpoints: Optional[RunCheckpoints] = None) -> MethodStage:
    if method.starts_from == "pretrained":
        start_model = copy.deepcopy(dense.model)
    else:
        torch.manual_seed(spec.seed)
        start_model = make_model()
    budget = method.method_budget(data.pretrain_steps, data.search_steps)
    ctx = MethodContext(
        model=start_model, model_name=spec.model, make_model=make_model,
        train_loader=data.loaders["train_method"], val_loader=data.loaders["val"], num_classes=data.info.num_classes,
        input_size=data.input_size, target=spec.target, budget=StepBudget(budget), recipe=spec.recipe,
        device=device, seed=spec.seed, config=method.config, progress=progress, dense_macs=dense.macs.macs,
        card=model_card(spec.model), data_info=data.info, checkpoints=checkpoints,
    )
    torch.manual_seed(spec.seed)
    start, paused = time.perf_counter(), timing_section().paused_seconds
    outcome, diverged = None, None
    try:
        try:
            outcome = method.run(ctx)
        except Exception:
            ctx.finish_trainers()      # a failure after an unread non-finite loss is that divergence
            raise
        ctx.finish_trainers()
        if ctx.adjustments:            # settings used otherwise than given: in the record beside what was used
            outcome.notes["adjusted"] = list(ctx.adjustments)
        _check_finite(outcome.model, "method")
    except Diverged as d:
        diverged = _in_stage(d, "method")
    except AssertionError as e:
        # The compaction check (masked == compacted outputs) is the one assertion a method
        # reaches; a NaN there means the weights went non-finite before compaction.
        if not _finite(ctx.model):
            diverged = Diverged("method", f"non-finite weights reached compaction ({e})")
        else:
            raise StageError(f"method stage ({spec.method}): {(str(e).splitlines() or ['assertion failed'])[0]}") from e
    finally:
        data.loaders.release()
    # a resumed run adds the time its loaded fits took before the interruption
    # and leaves out its pauses while other runs timed latency (their cost, not this method's)
    wall = time.perf_counter() - start - (timing_section().paused_seconds - paused) \
        + (checkpoints.restored_seconds if checkpoints is not None else 0.0)
    return MethodStage(outcome, budget, ctx.budget.used, wall, diverged, ctx.compute.as_dict(), ctx.curve.as_dict())


def _in_stage(d: Diverged, stage: str) -> Diverged:
    """The trainer's own non-finite-loss check knows no stage ("training"); name the stage it ran in."""
    return Diverged(stage, d.reason) if d.stage == "training" else d


# --- fine-tune --------------------------------------------------------------------------------
@dataclass
class FinetuneStage:
    steps: int = 0
    wall_seconds: float = 0.0
    best_val_top1: Optional[float] = None
    best_step: Optional[int] = None
    diverged: Optional[Diverged] = None
    train_macs: Optional[dict] = None
    curve: Optional[dict] = None


def finetune_stage(spec: RunSpec, outcome: Outcome, data: DataStage, device: torch.device,
                   progress=None, checkpoints: Optional[RunCheckpoints] = None,
                   from_scratch: bool = False) -> FinetuneStage:
    """The same recipe and steps for every method that prunes; masks held; selects on val.
    `from_scratch` (the `reinit` sanity check): the re-initialised structure trains for the dense
    pretrain + fine-tune steps at the pretrain learning rate, the steps the pruned model's weights had."""
    result = FinetuneStage()
    steps = data.pretrain_steps + data.finetune_steps if from_scratch else data.finetune_steps
    if outcome.finetune and steps > 0:
        torch.manual_seed(spec.seed)
        hooks = [outcome.masks] if outcome.masks is not None else []
        lr = spec.recipe.lr if from_scratch else spec.recipe.finetune_lr
        trainer = Trainer(outcome.model, data.loaders["train_finetune"], spec.recipe, device, data.info.num_classes,
                          lr, hooks, stage="finetune", checkpoints=checkpoints)
        try:
            fit = trainer.fit(steps, data.loaders["val"], data.eval_every, progress=progress,
                              desc="train from scratch" if from_scratch else "finetune")
            _check_finite(outcome.model, "finetune")
        except Diverged as d:
            return FinetuneStage(steps=trainer.step, diverged=d, train_macs=trainer.compute.as_dict(),
                                 curve=trainer.curve.as_dict())
        finally:
            data.loaders.release()
        result = FinetuneStage(fit.steps, fit.wall_seconds, fit.best_val_top1, fit.best_step,
                               train_macs=trainer.compute.as_dict(), curve=trainer.curve.as_dict())
    if outcome.masks is not None:
        outcome.masks.apply()
    return result


# --- evaluation -------------------------------------------------------------------------------
@dataclass
class EvaluationStage:
    val: Accuracy
    test: Accuracy                   # the one test evaluation of the run


def evaluation_stage(model: nn.Module, data: DataStage, device: torch.device, precision: str = "fp32") -> EvaluationStage:
    """Validation and the one test evaluation, under the training `precision`."""
    model.eval()
    try:
        val = evaluate(model, data.loaders["val"], device, data.info.num_classes, precision=precision)
        return EvaluationStage(val, evaluate(model, data.loaders["test"], device, data.info.num_classes,
                                             per_sample=True, precision=precision))
    finally:
        data.loaders.release()          # measurement times latency with no worker process left


# --- measurement ------------------------------------------------------------------------------
@dataclass
class MeasurementStage:
    macs: MacsReport
    params: dict
    sparsity: float                  # over the prunable set
    sparsity_all: float              # over all parameters
    prunable: Prunable
    realization: Realization
    latency: Optional[dict]
    measured_speedup: Optional[float]
    measured_speedup_batch: Optional[int]


def prunable_policy(prunable: List[str], card: ModelCard) -> Prunable:
    """Name the prunable set by which of the card's edge layers it leaves dense."""
    names = set(prunable)
    dense_layers = [layer for layer in card.edge_layers if f"{layer}.weight" not in names]
    policy = {0: "all conv/linear weights", 2: "input layer and classifier dense"}.get(
        len(dense_layers), "input layer dense" if card.first_layer in dense_layers else "classifier dense")
    return Prunable(policy=policy, dense_layers=dense_layers, tensors=len(prunable))


def sparsity_of(model: nn.Module, dense: nn.Module, prunable: List[str]) -> tuple:
    """(over the prunable set, over all params): removed or zeroed weights / dense count."""
    params = dict(model.named_parameters())
    dense_params = dict(dense.named_parameters())
    total = sum(dense_params[n].numel() for n in prunable)
    nnz = sum(int((params[n] != 0).sum()) for n in prunable if n in params)
    all_total = sum(p.numel() for p in dense.parameters())
    all_nnz = count_params(model)["params_nonzero"]
    return 1.0 - nnz / total, 1.0 - all_nnz / all_total


def measurement_stage(spec: RunSpec, outcome: Outcome, dense: DenseStage, data: DataStage,
                      device: torch.device, times: PhaseTimes = NO_TIMES) -> MeasurementStage:
    model = outcome.model
    prunable = outcome.prunable or [n for n, p in dense.model.named_parameters() if p.ndim > 1]
    with times("params"):
        sparsity, sparsity_all = sparsity_of(model, dense.model, prunable)
        params = count_params(model)
    with times("realization"):
        realized = realize(model, outcome.realization, device, spec.measure.dtype, outcome.pattern,
                           calibration=_calibration(spec, data))
    with times("latency"):
        latency = _latency(spec, realized, dense, data, device, model, outcome.pattern)
    with times("FLOPs counting"):
        macs = count_macs(model, data.input_size)
    batch = max(spec.measure.batch_sizes)
    return MeasurementStage(
        macs=macs, params=params, sparsity=sparsity,
        sparsity_all=sparsity_all, prunable=prunable_policy(prunable, model_card(spec.model)),
        realization=Realization(realized.realizable, realized.kind, realized.reason, realized.dtype,
                                plain(realized.details)),
        latency=latency, measured_speedup=latency[str(batch)]["measured_speedup"] if latency else None,
        measured_speedup_batch=batch if latency else None,
    )


def _calibration(spec: RunSpec, data: DataStage) -> Optional[Calibration]:
    """How the auto realizer of unstructured masks times its per-layer choice: at the throughput batch
    (where the record's measured speedup is read) and the latency's thread count. None where no latency
    is measured: no choice to make."""
    m = spec.measure
    if not (m.latency and current_platform().is_primary):
        return None
    return Calibration(input_size=tuple(data.input_size), batch=max(m.batch_sizes), threads=m.threads)


def _latency(spec: RunSpec, realized, dense: DenseStage, data: DataStage, device: torch.device,
             masked: Optional[nn.Module] = None, pattern: Optional[str] = None) -> Optional[dict]:
    latency = None
    # timed by the primary alone: the other ranks of a DDP run would share its cores, and it writes the record
    if spec.measure.latency and realized.realizable and current_platform().is_primary:
        m = spec.measure
        settings = LatencySettings(batch_sizes=m.batch_sizes, threads=m.threads, min_run_time=m.min_run_time,
                                   rounds=m.rounds, dtype=realized.dtype, channels_last=m.channels_last,
                                   compile=m.compile)
        latency = compare_realized(dense.model, masked, realized, data.input_size, settings, device, pattern,
                                   _calibration(spec, data))
        latency["settings"] = {"dtype": realized.dtype, "threads": m.threads, "batch_sizes": list(m.batch_sizes),
                               "channels_last": m.channels_last, "compile": m.compile, "device": str(device),
                               "rounds": m.rounds, "min_rounds": settings.min_rounds,
                               "stop_width": settings.stop_width,
                               "protocol": "alternating blocks, median; CPU torch.utils.benchmark, CUDA events; "
                                           "stops after min_rounds once the 95 % interval is narrower than "
                                           "stop_width × speedup; exclusive: the sweep's other workers paused"}
    return latency


# --- model artifact ---------------------------------------------------------------------------
def model_stage(spec: RunSpec, outcome: Outcome, dense: DenseStage, data: DataStage, options: RunOptions) -> dict:
    """The final model saved beside the record (`runners/artifacts.py`), written before the record so
    the record never names a file that is not whole; the record's `artifact` entry. A model the file
    format cannot rebuild exactly is not saved, and the entry says why."""
    from sparsebench.runners.artifacts import ArtifactError, save_model

    info = data.info
    kwargs = dict(num_classes=info.num_classes, img_size=info.img_size, in_chans=info.in_chans,
                  **dict(spec.model_args))
    masks = outcome.masks.masks if outcome.masks is not None else None
    try:
        return save_model(options.out, spec.run_id, outcome.model, dense.model, spec.model, kwargs,
                          outcome.realization, masks, data.input_size)
    except ArtifactError as e:
        import logging

        logging.getLogger("sparsebench").warning("sparsebench: warning: %s", e)
        return {"path": None, "reason": str(e)}


# --- record -----------------------------------------------------------------------------------
def record_stage(spec: RunSpec, method: Method, data: DataStage, dense: DenseStage, method_result: MethodStage,
                 finetune: FinetuneStage, evaluation: Optional[EvaluationStage],
                 measured: Optional[MeasurementStage], device: torch.device, resumed_fits: int = 0) -> RunRecord:
    """The record of a run: with a result (evaluation and measurement), or diverged (neither)."""
    diverged = method_result.diverged or finetune.diverged
    if (evaluation is None or measured is None) != (diverged is not None):
        raise ValueError("a record has either a result (evaluation and measurement) or a divergence")
    if dense is None and diverged is None:
        raise ValueError("only a run whose dense pretraining diverged has no dense checkpoint")
    ckpt = dense.checkpoint if dense is not None else _NO_CHECKPOINT     # None: the dense pretrain diverged
    dense_macs = dense.macs if dense is not None else None
    result: dict = dict.fromkeys(("achieved_sparsity", "achieved_sparsity_all_params", "achieved_flops_ratio",
                                  "test_top1", "test_top5", "val_top1", "test_samples", "params", "macs",
                                  "theoretical_speedup", "measured_speedup", "measured_speedup_batch",
                                  "realization", "latency", "prunable"))
    if diverged is None:
        macs = measured.macs
        outcome = method_result.outcome
        result.update(
            achieved_sparsity=measured.sparsity, achieved_sparsity_all_params=measured.sparsity_all,
            achieved_flops_ratio=macs.macs_effective / dense_macs.macs,
            test_top1=evaluation.test.top1, test_top5=evaluation.test.top5, val_top1=evaluation.val.top1,
            test_samples=evaluation.test.n,
            params=Params(dense=dense.params["params"], total=measured.params["params"],
                          nonzero=measured.params["params_nonzero"], prunable_tensors=measured.prunable.tensors),
            macs=Macs(dense=dense_macs.macs, realized=macs.macs, effective=macs.macs_effective,
                      attention=macs.attention_macs, flops_dense=dense_macs.flops,
                      flops_effective=macs.flops_effective, input_size=list(data.input_size), batch=1,
                      convention="torch FlopCounterMode, fused attention off, MACs = FLOPs / 2, "
                                 "element-wise excluded",
                      effective_is="theoretical" if outcome.realization == "masked" else "realized"),
            theoretical_speedup=dense_macs.macs / max(1, macs.macs_effective),
            measured_speedup=measured.measured_speedup, measured_speedup_batch=measured.measured_speedup_batch,
            realization=measured.realization, latency=plain(measured.latency), prunable=measured.prunable,
        )
    met, tolerance = target_check(spec.target.kind, spec.target.value, result["achieved_sparsity"],
                                  result["achieved_flops_ratio"], method.sparsity_tolerance,
                                  tuple(method.flops_tolerance))
    if diverged is not None:
        met, status = False, "diverged"
    else:
        status = "ok" if met else "missed_target"
    outcome = method_result.outcome
    return RunRecord(
        run_id=spec.run_id, spec_hash=spec.hash, spec=plain(spec.to_dict()),
        method=spec.method, model=spec.model, dataset=spec.dataset, seed=spec.seed,
        model_family=model_card(spec.model).family, granularity=method.granularity, starts_from=method.starts_from,
        target_kind=spec.target.kind, target_value=spec.target.value,
        status=status, target_met=met, tolerance=tolerance,
        dense_test_top1=ckpt.test_top1, dense_val_top1=ckpt.val_top1,
        cost=Cost(method_steps=method_result.steps, method_budget_steps=method_result.budget,
                  method_wall_seconds=method_result.wall_seconds, finetune_steps=finetune.steps,
                  finetune_wall_seconds=finetune.wall_seconds, dense_pretrain_steps=ckpt.steps,
                  dense_pretrain_wall_seconds=ckpt.wall_seconds,
                  train_macs={"method": method_result.train_macs, "finetune": finetune.train_macs,
                              "dense_pretrain": ckpt.train_macs, "convention": COST_CONVENTION},
                  resumed_fits=resumed_fits),
        selection={"split": "val", "eval_every": data.eval_every, "finetune_best_val_top1": finetune.best_val_top1,
                   "finetune_best_step": finetune.best_step, "test_evaluations": 0 if diverged else 1},
        dense_checkpoint={"hash": ckpt.hash, "file": ckpt.path.name if ckpt.path else None,
                          "val_top1": ckpt.val_top1, "test_top1": ckpt.test_top1,
                          "pretrained_sha256": ckpt.pretrained_sha256},
        data=plain({**data.split, "img_size": data.info.img_size, "num_classes": data.info.num_classes,
              "steps_per_epoch": data.steps_per_epoch, "source": data.info.source,
              **({"loader": data.loaders.plan.as_dict()} if data.loaders.plan is not None else {})}),
        structure=plain(outcome.structure) if outcome else None, notes=plain(outcome.notes) if outcome else {},
        sparsity_pattern=outcome.pattern if outcome else None,
        environment=plain({**_environment(device, spec.measure.threads),
                           "training_loop": training_loop(spec.recipe, device, dense.model if dense else None)}),
        code_version=plain(code_version()),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        plugin=dict(spec.plugin) or None, error=str(diverged) if diverged else None,
        mechanism=recorded_mechanism(method, outcome) if outcome is not None else None,
        per_sample=None if evaluation is None else PerSample.of(evaluation.test.correct, evaluation.test.labels,
                                                                spec.dataset, spec.data.split_seed),
        curves=plain({k: v for k, v in (("method", method_result.curve), ("finetune", finetune.curve)) if v}) or None,
        **result,
    )


def recorded_mechanism(method: Method, outcome: Outcome) -> Mechanism:
    """The record's `mechanism`: the method's own verdict; "no mechanism" for a baseline; and
    for a method that declares a mechanism but reported none, a verdict that it did not act."""
    if outcome.mechanism is not None:
        return outcome.mechanism
    if method.null_control is None:
        return NO_MECHANISM
    return Mechanism(declared=True, acted=False, reason="the method declares a mechanism but reported no telemetry",
                     control=method.is_control, signal_control=None if method.is_control else method.signal_control)


def _environment(device: torch.device, threads: int) -> dict:
    """The environment, with the number of training processes when a run trains under torchrun."""
    env = environment(device, threads)
    if device.type == "cuda":     # the most this run held (`sweep --jobs-per-gpu` packs runs by it)
        env["peak_device_memory_bytes"] = int(torch.cuda.max_memory_reserved(device))
    world = current_platform().world_size
    return {**env, "world_size": world} if world > 1 else env


# What the record says of the dense checkpoint when dense pretraining diverged: nothing was cached.
_NO_CHECKPOINT = DenseCheckpoint(path=None, hash=None, val_top1=None, test_top1=None, test_top5=None, steps=0,
                                 wall_seconds=0.0, pretrained_sha256=None, train_macs=None)


# --- the run ----------------------------------------------------------------------------------
def execute(spec: RunSpec, options: RunOptions, times: PhaseTimes = NO_TIMES) -> RunRecord:
    """Run one spec end to end, stage by stage, and write its record; returns the record.
    `times` receives the seconds spent per phase (`PhaseTimes`). Its training steps, evaluations
    and latency timing go through the results store's timing section (`timing_section_path`)."""
    spec = resolve(spec)        # the run id the record and the live curves share
    with use_timing_section(timing_section_path(options)), use_watch(run_watch(spec, options)) as watch:
        _reset_peak_device_memory(torch.device(options.device))
        return _execute(spec, options, times, watch)


def run_watch(spec: RunSpec, options: RunOptions) -> Optional[RunWatch]:
    """The run's live logging and resource sampling (rank 0 only; `training/watch.py`)."""
    if not current_platform().is_primary:
        return None
    trackers = make_trackers(options.tracker, Path(options.out), spec.run_id, flat_params(plain(spec.to_dict())),
                             options.tracker_uri)
    return RunWatch(trackers, torch.device(options.device), progress_every=options.progress_every,
                    status_path=progress_dir(options.out) / f"{spec.run_id}.json",
                    label=f"{spec.method} {spec.model} {spec.target}")


def progress_dir(out: Path) -> Path:
    """Where the runs in progress into results directory `out` keep their progress for a sweep's lines."""
    return Path(out) / ".progress"


def _watched(record: RunRecord, watch: Optional[RunWatch]) -> RunRecord:
    return record if watch is None else dataclasses.replace(record, resources=watch.resources())


def _reset_peak_device_memory(device: torch.device) -> None:
    """On CUDA: the record's peak device memory is this run's, not an earlier run's in the same worker
    (the cache it left is handed back first: a worker sharing its GPU holds no more than its run needs)."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def timing_section_path(options: RunOptions) -> Optional[Path]:
    """The timing section every run into `options.out` on this host shares (`platform.TimingSection`):
    while one run times latency, the others pause at their next step. None under torchrun (the ranks
    of one run step together; one paused mid-collective would hold the others) or when switched off."""
    if not options.exclusive_timing or current_platform().world_size > 1:
        return None
    return Path(options.out) / ".locks" / f"timing-{socket.gethostname()}"


def _execute(spec: RunSpec, options: RunOptions, times: PhaseTimes, watch: Optional[RunWatch] = None) -> RunRecord:
    with times("setup"):
        method = validate(spec)
        spec = _with_full_config(spec, method)
        device = torch.device(options.device)
        torch.set_num_threads(spec.measure.threads)
        torch.backends.cudnn.benchmark = cudnn_benchmark(device)     # per run, and stated in its record
    progress = options.progress

    with times("data"):
        data = data_stage(spec, options)
    with times("setup"):
        make_model = model_factory(spec, data.info, device)
        require_support(spec, method, make_model())
    cache = cache_dir_of(options)
    try:
        dense = dense_stage(spec, data, make_model, device, cache, progress, options.checkpoint_every,
                            options.resume, lock_wait(options), times)
    except Diverged as d:           # nothing cached; every run on this dense model says so in its record
        record = _watched(diverged_dense_record(spec, method, data, d, device), watch)
        RecordStore(options.out).write(record)
        return record
    # where the method's and the fine-tune's fits save and resume (not in the spec hash)
    partial = RunCheckpoints(Path(options.out) / "partial" / spec.hash, options.checkpoint_every) \
        if options.resume else None

    method_result, finetune, evaluation, measured = train_and_measure(spec, method, data, dense, make_model, device,
                                                                      progress, partial, times)
    with times("record"):
        record = record_stage(spec, method, data, dense, method_result, finetune, evaluation, measured, device,
                              partial.resumed if partial is not None else 0)
        if options.save_model and evaluation is not None and current_platform().is_primary:
            record = dataclasses.replace(record, artifact=model_stage(spec, method_result.outcome, dense, data, options))
        record = _watched(record, watch)
        store = RecordStore(options.out)
        store.write(record)
        if partial is not None:
            partial.clear()
    if watch is not None:
        model = (record.artifact or {}).get("path")
        watch.artifacts([store.path(record.run_id), Path(options.out) / model if model else None])
    return record


def require_support(spec: RunSpec, method: Method, probe: nn.Module) -> None:
    """A one-line SpecError where the method cannot run on the spec's model (`probe`, one instance)."""
    family = model_card(spec.model).family
    if not method.supports(probe, family):
        raise SpecError(f"method {spec.method!r} does not support model {spec.model!r} ({family})")


def diverged_dense_record(spec: RunSpec, method: Method, data: DataStage, diverged: Diverged,
                          device: torch.device) -> RunRecord:
    """The record of a run whose dense checkpoint diverged: no method, fine-tune or measurement."""
    return record_stage(spec, method, data, None, MethodStage(None, 0, 0, 0.0, diverged), FinetuneStage(),
                        None, None, device)


def train_and_measure(spec: RunSpec, method: Method, data: DataStage, dense: DenseStage, make_model,
                      device: torch.device, progress=None, partial: Optional[RunCheckpoints] = None,
                      times: PhaseTimes = NO_TIMES) -> tuple:
    """(method, fine-tune, evaluation, measurement) stages from the dense checkpoint on, each only if
    the one before did not diverge (then the later ones stay empty and the record says so)."""
    with times("method"):
        method_result = method_stage(spec, method, data, dense, make_model, device, progress, partial)
    finetune, evaluation, measured = FinetuneStage(), None, None
    from_scratch = method_result.diverged is None and sanity_of(method) == "reinit"
    if from_scratch:
        reinitialised(spec, method_result.outcome, data)
    if method_result.diverged is None:
        with times("finetune"):
            finetune = finetune_stage(spec, method_result.outcome, data, device, progress, partial, from_scratch)
        if finetune.diverged is None:
            with times("evaluation"):
                evaluation = evaluation_stage(method_result.outcome.model, data, device, spec.recipe.precision)
            measured = measurement_stage(spec, method_result.outcome, dense, data, device, times)
    return method_result, finetune, evaluation, measured


def reinitialised(spec: RunSpec, outcome: Outcome, data: DataStage) -> None:
    """The `reinit` sanity check (`training.sanity`): the method's structure (compacted model or
    masks) with fresh weights, seeded by the run's seed; the record's notes say so."""
    counts = reinitialise(outcome.model, torch.Generator().manual_seed(spec.seed))
    if outcome.masks is not None:
        outcome.masks.apply()
    outcome.notes["sanity"] = {
        "check": "reinit", "initialisation": counts,
        "trained_steps": data.pretrain_steps + data.finetune_steps, "lr": spec.recipe.lr,
        "why": "the found structure re-initialised and trained from scratch for the dense pretrain + "
               "fine-tune steps (Liu et al. 2019; Frankle et al. 2021)"}
    if spec.pretrained:
        # the dense model started from weights trained elsewhere (e.g. ImageNet): their training is
        # not in this run's budget, so the scratch run gets far fewer steps than the weights had
        outcome.notes["sanity"]["budget"] = (
            f"not equal: the dense model started from {spec.pretrained}, whose own training is not counted; "
            f"the re-initialised structure trained {data.pretrain_steps + data.finetune_steps} steps on this "
            "dataset only")
        warnings.warn(f"sanity=reinit from pretrained weights ({spec.pretrained}): the scratch run's budget is "
                      "not the weights' own training; its record says so", stacklevel=2)


def prepare_dense(spec: RunSpec, options: RunOptions) -> DenseCheckpoint:
    """Only the dense checkpoint `execute(spec)` will start from: trained (or found) and cached.
    A launcher schedules this once per (model, data, seed, pretrain recipe) ahead of its runs."""
    method = validate(spec)
    spec = _with_full_config(spec, method)
    device = torch.device(options.device)
    torch.set_num_threads(spec.measure.threads)
    torch.backends.cudnn.benchmark = cudnn_benchmark(device)
    data = data_stage(spec, options)
    try:
        return dense_checkpoint(spec, cache_dir_of(options), model_factory(spec, data.info, device), data.loaders,
                                data.info.num_classes, device, data.pretrain_steps, data.eval_every,
                                options.progress, options.checkpoint_every, options.resume, lock_wait(options))
    finally:
        data.loaders.release()


def cache_dir_of(options: RunOptions) -> Path:
    return Path(options.cache_dir) if options.cache_dir else Path(options.out) / "checkpoints"


def failed_record(spec: RunSpec, error: str, device: str = "cpu") -> RunRecord:
    """The record of a run that raised: status "failed", its error, no metrics (so it never
    enters a leaderboard's means); `sweep --retry-failed` runs it again."""
    try:
        method = validate(spec)
        spec = _with_full_config(spec, method)
        granularity, starts_from = method.granularity, method.starts_from
    except Exception:  # noqa: BLE001 -- the failure may be this very validation
        granularity = starts_from = "unknown"
    try:
        family = model_card(spec.model).family
    except Exception:  # noqa: BLE001
        family = "unknown"
    try:
        env = environment(torch.device(device), spec.measure.threads)
    except Exception:  # noqa: BLE001 -- e.g. the CUDA device the run could not reach
        env = {"device": device}
    return RunRecord(
        run_id=spec.run_id, spec_hash=spec.hash, spec=plain(spec.to_dict()), method=spec.method, model=spec.model,
        dataset=spec.dataset, seed=spec.seed, model_family=family, granularity=granularity, starts_from=starts_from,
        target_kind=spec.target.kind, target_value=spec.target.value, status="failed", target_met=False,
        tolerance=None, dense_test_top1=None, dense_val_top1=None,
        cost=Cost(method_steps=0, method_budget_steps=0, method_wall_seconds=0.0, finetune_steps=0,
                  finetune_wall_seconds=0.0, dense_pretrain_steps=0, dense_pretrain_wall_seconds=0.0),
        selection={}, dense_checkpoint={}, data={}, structure=None, notes={},
        environment=plain(env), code_version=plain(code_version()),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), plugin=dict(spec.plugin) or None,
        error=error, **dict.fromkeys(("achieved_sparsity", "achieved_sparsity_all_params", "achieved_flops_ratio",
                                      "test_top1", "test_top5", "val_top1", "test_samples", "params", "macs",
                                      "theoretical_speedup", "measured_speedup", "measured_speedup_batch",
                                      "realization", "latency", "prunable")))


def _finite(model: nn.Module) -> bool:
    return not non_finite_tensors(model)


def _check_finite(model: nn.Module, stage: str) -> None:
    """Weights can go non-finite without a non-finite loss reaching a guard (a method's own
    update rule, BN statistics); such a model is never evaluated or recorded as a result.
    Under DDP, BN statistics are per rank: one rank's bad buffers end every rank's stage."""
    finite = _finite(model)
    if any_rank(not finite):
        raise Diverged(stage, "non-finite weights or buffers" + ("" if not finite else " on another rank"))

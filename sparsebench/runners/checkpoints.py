"""The dense checkpoint: one trained model per (model, dataset, seed, recipe), cached by hash.

Every method that starts from a trained model starts from this same file, and its
accuracy is the dense reference stored in every record. Training is guarded by a file
lock, so parallel workers train it once; the lock file names its holder (pid, host, since when),
and a wait for it is reported after a few seconds and bounded (`lock_wait`). Its fits checkpoint under
`<cache>/partial/dense-<hash>/` like a run's (`training/resume.py`): a killed pretrain resumes,
and the partial files go once the checkpoint is written. Under torch.distributed the ranks of one
run train it together: the primary alone holds the lock, decides whether the cache is sound
(broadcast to the others) and writes the file; the others load it after a barrier.

A cached file is trusted only if it loads with `weights_only=True` and stores the key of
this run; anything else (truncated, random bytes, empty, another run's key) is moved aside
as `*.bad-<time>` with one warning line and the checkpoint is trained again. A model whose
weights or validation loss are not finite is never cached: `Diverged` is raised instead.
"""
from __future__ import annotations

import io
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from sparsebench.errors import Diverged
from sparsebench.specs import RunSpec, stable_hash
from sparsebench.training.resume import RunCheckpoints
from sparsebench.runners.loaders import release_workers
from sparsebench.training.trainer import Trainer, evaluate, non_finite_tensors
from sparsebench.models.pretrained import load_pretrained
from sparsebench.platform import any_rank, current as current_platform

log = logging.getLogger("sparsebench")
META_KEYS = ("hash", "val_top1", "test_top1", "test_top5", "steps", "wall_seconds", "pretrained_sha256",
             "train_macs")


@dataclass
class DenseCheckpoint:
    path: Path
    hash: str
    val_top1: float
    test_top1: float
    test_top5: Optional[float]
    steps: int
    wall_seconds: float
    pretrained_sha256: Optional[str]
    train_macs: Optional[dict] = None     # forward/backward MACs of the pretrain (None: cached before counting)

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items()}


def dense_checkpoint(
    spec: RunSpec,
    cache_dir: Path,
    make_model: Callable[[], nn.Module],
    loaders: dict,
    num_classes: int,
    device: torch.device,
    steps: int,
    eval_every: int,
    progress=None,
    checkpoint_every: Optional[int] = None,
    resume: bool = True,
    lock_wait: Optional[dict] = None,
) -> DenseCheckpoint:
    """The cached checkpoint, or trained now under its lock. `lock_wait`: how the lock is waited for
    (`file_lock`'s timeout, notice_after); a lock not taken in time raises `LockTimeout`."""
    key = spec.dense_key()
    digest = stable_hash(key)
    path = dense_path(spec, cache_dir)
    platform = current_platform()
    with platform.primary_lock(path.with_suffix(".lock"), what="dense checkpoint", **(lock_wait or {})):
        meta = _cached_meta(path, key) if platform.is_primary and path.exists() else None
        meta = platform.broadcast(meta)
        if meta is not None:
            return DenseCheckpoint(path=path, **meta)
        partial = RunCheckpoints(Path(cache_dir) / "partial" / f"dense-{digest[:16]}", checkpoint_every) \
            if resume else None
        torch.manual_seed(spec.seed)
        model = make_model().to(device)
        pretrained_sha = load_pretrained(model, spec.model, spec.pretrained) if spec.pretrained else None
        trainer = Trainer(model, loaders["train_dense"], spec.recipe, device, num_classes, spec.recipe.lr,
                          checkpoints=partial, stage="dense")
        try:
            result = trainer.fit(steps, loaders["val"], eval_every, progress=progress, desc="dense")
        finally:        # the fit's workers and prefetched batches are not kept through the evaluations
            release_workers(loaders["train_dense"])
        wall = result.wall_seconds
        val = evaluate(model, loaders["val"], device, num_classes, precision=spec.recipe.precision)
        _check_finite(model, val.loss, spec)
        test = evaluate(model, loaders["test"], device, num_classes,   # the dense reference, once
                        precision=spec.recipe.precision)
        meta = {"hash": digest, "val_top1": val.top1, "test_top1": test.top1, "test_top5": test.top5,
                "steps": result.steps, "wall_seconds": wall, "pretrained_sha256": pretrained_sha,
                "train_macs": trainer.compute.as_dict()}
        buffer = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "meta": meta, "key": key}, buffer)
        platform.write_bytes(path, buffer.getvalue())
        if partial is not None:
            partial.clear()
        platform.barrier()                 # the file is there before any rank reads it
        return DenseCheckpoint(path=path, **meta)


def dense_path(spec: RunSpec, cache_dir: Path) -> Path:
    """Where the dense checkpoint of `spec` is cached (a launcher plans training only where it is missing)."""
    digest = stable_hash(spec.dense_key())
    return Path(cache_dir) / f"dense-{spec.model}-{spec.dataset}-s{spec.seed}-{digest[:12]}.pt"


def _cached_meta(path: Path, key: dict) -> Optional[dict]:
    """The meta of a sound cache file for `key`, or None after moving a bad one aside."""
    problem = None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 -- truncated, empty, random bytes, foreign pickle: all unreadable
        problem = f"unreadable ({type(e).__name__})"
    else:
        if not isinstance(blob, dict) or not isinstance(blob.get("meta"), dict) or "state_dict" not in blob:
            problem = "not a dense checkpoint"
        elif blob.get("key") != key:
            problem = "its stored key does not match this run"
        elif not set(META_KEYS) - {"train_macs"} <= set(blob["meta"]) <= set(META_KEYS):   # train_macs came later
            problem = "its metadata is incomplete"
    if problem is None:
        return {"train_macs": None, **blob["meta"]}
    aside = path.with_name(f"{path.name}.bad-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    log.warning("sparsebench: warning: dense checkpoint %s is %s; moved it to %s and training it again",
                path, problem, aside.name)
    return None


def _check_finite(model: nn.Module, val_loss: float, spec: RunSpec) -> None:
    bad = non_finite_tensors(model)
    if any_rank(bool(bad) or not math.isfinite(val_loss)):      # BN statistics are per DDP rank
        what = f"non-finite weights in {bad[0]}" if bad else \
            f"validation loss {val_loss}" if not math.isfinite(val_loss) else "non-finite weights on another rank"
        raise Diverged("dense", f"{spec.model} on {spec.dataset} (seed {spec.seed}, lr {spec.recipe.lr:g}): "
                                f"{what}; nothing was cached")


def load_dense_weights(model: nn.Module, checkpoint: DenseCheckpoint) -> nn.Module:
    state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    return model


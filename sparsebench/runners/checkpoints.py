"""The dense checkpoint: one trained model per (model, dataset, seed, recipe), cached by hash.

Every method that starts from a trained model starts from this same file, and its
accuracy is the dense reference stored in every record. Training is guarded by a file
lock, so parallel workers train it once. Its fits checkpoint under
`<cache>/partial/dense-<hash>/` like a run's (`training/resume.py`): a killed pretrain resumes,
and the partial files go once the checkpoint is written.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from sparsebench.specs import RunSpec, stable_hash
from sparsebench.training.resume import RunCheckpoints
from sparsebench.training.trainer import Trainer, evaluate
from sparsebench.models.pretrained import load_pretrained
from sparsebench.store.records import atomic_write_bytes, file_lock


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
) -> DenseCheckpoint:
    key = spec.dense_key()
    digest = stable_hash(key)
    path = Path(cache_dir) / f"dense-{spec.model}-{spec.dataset}-s{spec.seed}-{digest[:12]}.pt"
    with file_lock(path.with_suffix(".lock")):
        if path.exists():
            meta = torch.load(path, map_location="cpu", weights_only=True)["meta"]
            return DenseCheckpoint(path=path, **meta)
        partial = RunCheckpoints(Path(cache_dir) / "partial" / f"dense-{digest[:16]}", checkpoint_every) \
            if resume else None
        torch.manual_seed(spec.seed)
        model = make_model().to(device)
        pretrained_sha = load_pretrained(model, spec.model, spec.pretrained) if spec.pretrained else None
        trainer = Trainer(model, loaders["train_dense"], spec.recipe, device, num_classes, spec.recipe.lr,
                          checkpoints=partial, stage="dense")
        result = trainer.fit(steps, loaders["val"], eval_every, progress=progress, desc="dense")
        wall = result.wall_seconds
        val = evaluate(model, loaders["val"], device, num_classes)
        test = evaluate(model, loaders["test"], device, num_classes)   # the dense reference, once
        meta = {"hash": digest, "val_top1": val.top1, "test_top1": test.top1, "test_top5": test.top5,
                "steps": result.steps, "wall_seconds": wall, "pretrained_sha256": pretrained_sha,
                "train_macs": trainer.compute.as_dict()}
        buffer = io.BytesIO()
        torch.save({"state_dict": model.state_dict(), "meta": meta, "key": key}, buffer)
        atomic_write_bytes(path, buffer.getvalue())
        if partial is not None:
            partial.clear()
        return DenseCheckpoint(path=path, **meta)


def load_dense_weights(model: nn.Module, checkpoint: DenseCheckpoint) -> nn.Module:
    state = torch.load(checkpoint.path, map_location="cpu", weights_only=True)["state_dict"]
    model.load_state_dict(state)
    return model


"""What every named dataset provides, and the one place validation is carved from train.

A dataset module registers a *loader*: a function that returns the official train split
twice (once with training augmentation, once with evaluation transforms, same order), the
official test split, and a `DatasetInfo`. `create_dataset` then carves a seeded,
stratified validation split out of train, so that model selection never touches test.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, Subset

from sparsebench.registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register

DATA_ENV = "SPARSEBENCH_DATA"


class DataError(ValueError):
    """Data missing, incomplete or corrupt; the message says where and how to fix it."""


class DatasetNotFoundError(DataError):
    pass


class DatasetCorruptError(DataError):
    pass


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    img_size: int                      # resolution the model sees
    mean: Tuple[float, float, float]   # normalisation of uint8 images, applied by the loader on the device
    std: Tuple[float, float, float]
    in_chans: int = 3
    source: str = ""                   # where the data comes from, licence


@dataclass
class LoadedSplits:
    """What a registered loader returns: official splits, before validation is carved."""

    train: Dataset          # official train split, training augmentation
    train_eval: Dataset     # the same samples in the same order, evaluation transforms
    test: Dataset
    targets: Sequence[int]  # labels of `train`, used to stratify the validation split
    info: DatasetInfo


@dataclass
class DatasetSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    info: DatasetInfo
    split: dict = field(default_factory=dict)   # sizes, seed and fraction, stored in records


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ENV, Path.home() / ".cache" / "sparsebench" / "data"))


def stratified_split(targets: Sequence[int], val_fraction: float, seed: int):
    """Seeded stratified split of indices into (train, val); every class keeps ≥ 1 train sample."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} must be in (0, 1)")
    targets = np.asarray(targets)
    rng = np.random.default_rng(seed)
    train_idx, val_idx = [], []
    for c in np.unique(targets):
        idx = np.flatnonzero(targets == c)
        rng.shuffle(idx)
        n_val = int(round(len(idx) * val_fraction))
        n_val = min(n_val, len(idx) - 1)
        val_idx.extend(idx[:n_val].tolist())
        train_idx.extend(idx[n_val:].tolist())
    return sorted(train_idx), sorted(val_idx)


def create_dataset(
    name: str,
    data_root: Optional[str] = None,
    img_size: Optional[int] = None,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = False,
) -> DatasetSplits:
    """Build a named dataset with train / validation (carved from train) / test splits."""
    entry = DATASETS.get(name)
    root = Path(data_root) if data_root else default_data_root()
    loaded: LoadedSplits = entry.factory(root=root, img_size=img_size, download=download)
    train_idx, val_idx = stratified_split(loaded.targets, val_fraction, split_seed)
    split = {
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "n_train": len(train_idx),
        "n_val": len(val_idx),
        "n_test": len(loaded.test),
    }
    return DatasetSplits(
        train=Subset(loaded.train, train_idx),
        val=Subset(loaded.train_eval, val_idx),
        test=loaded.test,
        info=loaded.info,
        split=split,
    )

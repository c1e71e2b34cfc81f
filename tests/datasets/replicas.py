"""Small replicas of each real dataset's on-disk format, for the loader tests: the fabricators
live in `sparsebench.datasets.replicas` (the smoke mode uses them too); this module adds the
assertions shared by the per-dataset test files.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from sparsebench.datasets.replicas import (  # noqa: F401  (the fabricators live in the package)
    CIFAR10_CLASSES, FOOD_CLASSES, IMAGENET_WNIDS, PETS_BREEDS, PARTIAL_ENV, TINY_WNIDS, Py2Str, fabricate,
    make_cifar10, make_cifar100, make_flowers102, make_food101, make_imagenet, make_pets, make_tiny_imagenet,
    write_image, write_py2_pickle,
)
from sparsebench.training.loading import device_loader


# --------------------------------------------------------------------------- shared assertions


def allow_partial(monkeypatch) -> None:
    monkeypatch.setenv(PARTIAL_ENV, "1")


def check_splits(splits, num_classes: int, n_train_total: int, n_test: int, img_size: int, val_fraction: float):
    """Sizes, val carving, one sample of each split and a DataLoader batch."""
    info = splits.info
    assert info.num_classes == num_classes
    assert info.img_size == img_size
    assert info.in_chans == 3 and info.source
    s = splits.split
    assert s["n_train"] + s["n_val"] == n_train_total
    assert s["n_val"] > 0 and s["n_test"] == n_test == len(splits.test)
    assert s["val_fraction"] == val_fraction
    assert len(splits.train) == s["n_train"] and len(splits.val) == s["n_val"]
    # validation is carved from train: disjoint index sets covering the official train split
    train_idx, val_idx = set(splits.train.indices), set(splits.val.indices)
    assert not train_idx & val_idx and len(train_idx | val_idx) == n_train_total

    for ds in (splits.train, splits.val, splits.test):
        x, y = ds[0]
        assert isinstance(x, torch.Tensor) and x.dtype == torch.uint8     # normalised by the loader
        assert tuple(x.shape) == (3, img_size, img_size)
        assert isinstance(y, int) and 0 <= y < num_classes
    xb, yb = next(iter(device_loader(splits.train, "cpu", info.mean, info.std, batch_size=4, shuffle=True)))
    assert xb.shape == (min(4, len(splits.train)), 3, img_size, img_size) and xb.dtype == torch.float32
    assert yb.dtype == torch.int64 and int(yb.min()) >= 0 and int(yb.max()) < num_classes
    # normalised, not raw [0, 1] pixels
    assert float(xb.min()) < 0.0
    # DataLoader workers started with 'spawn' (macOS, Windows) need picklable datasets
    for ds in (splits.train, splits.val, splits.test):
        assert len(pickle.loads(pickle.dumps(ds))) == len(ds)
    # every label of the eval view of the test split is in range
    labels = [splits.test[i][1] for i in range(len(splits.test))]
    assert min(labels) >= 0 and max(labels) < num_classes


def assert_not_found(exc_info, where: Path) -> None:
    msg = str(exc_info.value)
    assert "\n" not in msg
    assert str(where) in msg
    assert "SPARSEBENCH_DATA" in msg


def assert_one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg and msg
    return msg

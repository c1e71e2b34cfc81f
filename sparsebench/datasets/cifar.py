"""`cifar10` and `cifar100`: the CIFAR python pickle batches, read with torchvision.

Layout under the data root (what torchvision's download extracts)::

    cifar-10-batches-py/data_batch_1 .. data_batch_5, test_batch, batches.meta
    cifar-100-python/train, test, meta

Official splits: train 50,000 / test 10,000 for both. Native 32 px, trained with
RandomCrop(32, padding=4) + RandomHorizontalFlip and per-dataset mean/std.

At load time every file must be present and, for a full copy, match torchvision's
published MD5; the pickles are parsed (they are small: 180 MB in all) and the sample count,
class count and label range are checked. With ``SPARSEBENCH_ALLOW_PARTIAL_DATA=1`` the MD5
and official-size checks are skipped (see `sparsebench.datasets._checks`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Type

import numpy as np
from torchvision.datasets import CIFAR10, CIFAR100
from torchvision.datasets.utils import check_integrity

from sparsebench.datasets._checks import (
    check_count,
    corrupt,
    guarded,
    guarded_download,
    not_found,
    partial_data_allowed,
    require_files,
)
from sparsebench.datasets.base import DatasetInfo, LoadedSplits, register_dataset
from sparsebench.datasets.transforms import small_image_transforms, image_splits

NATIVE_SIZE = 32


class _CIFAR10NoMD5(CIFAR10):
    """torchvision's CIFAR10 with the per-file MD5 check turned into an existence check.

    We verify the checksums ourselves (once, with a clear message) for a full copy and skip
    them for a deliberate partial copy.
    """

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class _CIFAR100NoMD5(CIFAR100):
    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


@dataclass(frozen=True)
class CifarSpec:
    name: str
    official: Type[CIFAR10]
    unchecked: Type[CIFAR10]
    num_classes: int
    n_train: int
    n_test: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    source: str


CIFAR_SOURCE = (
    "Krizhevsky, 'Learning Multiple Layers of Features from Tiny Images' (2009), "
    "https://www.cs.toronto.edu/~kriz/cifar.html; no formal licence is stated, the authors "
    "distribute it freely for research, cite the report"
)

SPECS = {
    "cifar10": CifarSpec(
        "cifar10", CIFAR10, _CIFAR10NoMD5, 10, 50_000, 10_000,
        (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), "CIFAR-10, " + CIFAR_SOURCE,
    ),
    "cifar100": CifarSpec(
        "cifar100", CIFAR100, _CIFAR100NoMD5, 100, 50_000, 10_000,
        (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), "CIFAR-100, " + CIFAR_SOURCE,
    ),
}


def load_cifar(spec: CifarSpec, root: Path, img_size: Optional[int], download: bool) -> LoadedSplits:
    root = Path(root)
    tv = spec.official
    base = root / tv.base_folder
    if download and not base.is_dir():
        # torchvision verifies the archive's MD5; the per-file MD5s are checked below
        guarded_download(spec.name, root, tv.url, lambda: spec.unchecked(str(root), train=True, download=True))
    if not base.is_dir():
        raise not_found(spec.name, base, root)

    files = [f for f, _ in tv.train_list + tv.test_list] + [tv.meta["filename"]]
    require_files(spec.name, base, *files)
    if not partial_data_allowed():
        checksums = [(f, md5) for f, md5 in tv.train_list + tv.test_list] + [(tv.meta["filename"], tv.meta["md5"])]
        for f, md5 in checksums:
            if not check_integrity(str(base / f), md5):
                raise corrupt(
                    spec.name, base,
                    f"{f} does not match the official MD5 (set SPARSEBENCH_ALLOW_PARTIAL_DATA=1 "
                    f"only for a deliberately modified copy)",
                )

    train = guarded(spec.name, base, "reading the train batches", lambda: spec.unchecked(str(root), train=True))
    test = guarded(spec.name, base, "reading the test batch", lambda: spec.unchecked(str(root), train=False))

    num_classes = len(train.classes)
    check_count(spec.name, base, "the number of classes in the metadata", num_classes, spec.num_classes)
    check_count(spec.name, base, "the number of train samples", len(train.targets), spec.n_train)
    check_count(spec.name, base, "the number of test samples", len(test.targets), spec.n_test)
    for split, ds in (("train", train), ("test", test)):
        if len(ds.data) != len(ds.targets):
            raise corrupt(spec.name, base, f"{split}: {len(ds.data)} images but {len(ds.targets)} labels")
        if len(ds.targets) == 0:
            raise corrupt(spec.name, base, f"{split} split is empty")
        labels = np.asarray(ds.targets)
        if labels.min() < 0 or labels.max() >= num_classes:
            raise corrupt(spec.name, base, f"{split} labels outside 0..{num_classes - 1}")

    size = img_size or NATIVE_SIZE
    train_tf, eval_tf = small_image_transforms(NATIVE_SIZE, size)
    info = DatasetInfo(
        name=spec.name, num_classes=num_classes, img_size=size, mean=spec.mean, std=spec.std, source=spec.source,
    )
    return image_splits(train, test, train.targets, (train_tf, eval_tf), info)


@register_dataset("cifar10", "CIFAR-10, 10 classes, 50k train / 10k test, 3x32x32 (data root, --download)")
def load_cifar10(root: Path, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    return load_cifar(SPECS["cifar10"], root, img_size, download)


@register_dataset("cifar100", "CIFAR-100, 100 classes, 50k train / 10k test, 3x32x32 (data root, --download)")
def load_cifar100(root: Path, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    return load_cifar(SPECS["cifar100"], root, img_size, download)

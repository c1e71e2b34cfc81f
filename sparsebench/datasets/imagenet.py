"""`imagenet`: ImageNet-1k (ILSVRC2012) from a local folder, read with torchvision ImageFolder.

Layout under the data root::

    imagenet/train/<wnid>/*.JPEG     1,281,167 images, 1,000 class folders
    imagenet/val/<wnid>/*.JPEG       50,000 images, the same 1,000 class folders

The validation images must be sorted into class subfolders (the archive ships them flat;
the usual ``valprep.sh`` script moves them). The official val split is our test split, our
validation split is carved from train by `create_dataset`. A symlink
``<data root>/imagenet -> /wherever/ILSVRC2012`` is fine.

ImageNet cannot be downloaded automatically: it has to be obtained from image-net.org after
registration and acceptance of the terms of access. Trained at 224 px by default
(RandomResizedCrop + flip; eval Resize(256) + CenterCrop(224)).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from torchvision.datasets import ImageFolder

from sparsebench.datasets._checks import (
    check_count,
    corrupt,
    guarded,
    listdir,
    not_found,
    require_files,
    set_refetch_hint,
)
from sparsebench.datasets.base import DATA_ENV, DatasetInfo, LoadedSplits, register_dataset
from sparsebench.datasets.transforms import IMAGENET_MEAN, IMAGENET_STD, transfer_transforms, image_splits

NAME = "imagenet"
FOLDER = "imagenet"
DEFAULT_SIZE = 224
EXPECTED_CLASSES = 1000
EXPECTED_TRAIN = 1_281_167
EXPECTED_TEST = 50_000
SOURCE = (
    "ImageNet-1k (ILSVRC2012), Russakovsky et al., IJCV 2015, https://image-net.org; obtained "
    "manually under the ImageNet terms of access (non-commercial research and education only)"
)

set_refetch_hint(
    NAME,
    "re-extract it from the ILSVRC2012 archives from https://image-net.org (val sorted into class subfolders)",
)


def _how_to_fetch(base: Path) -> str:
    return (
        f"ImageNet cannot be downloaded automatically (--download does not apply): obtain ILSVRC2012 train and val "
        f"from https://image-net.org (registration required) and extract them to {base}/train/<wnid>/*.JPEG and "
        f"{base}/val/<wnid>/*.JPEG (val sorted into class subfolders, e.g. with valprep.sh), "
        f"or set {DATA_ENV}=/path to a data root that holds imagenet/"
    )


def _class_dirs(folder: Path) -> list:
    return sorted(n for n in listdir(folder) if (folder / n).is_dir())


@register_dataset("imagenet", "ImageNet-1k (ILSVRC2012), 1000 classes, local folder only (no download), 224 px")
def load_imagenet(root: Path, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    root = Path(root)
    base = root / FOLDER
    if not base.is_dir():
        raise not_found(NAME, base, root, _how_to_fetch(base))
    require_files(NAME, base, "train", "val")

    train_classes, val_classes = _class_dirs(base / "train"), _class_dirs(base / "val")
    if not train_classes:
        raise corrupt(NAME, base, "train/ has no class folders (expected train/<wnid>/*.JPEG)")
    if not val_classes:
        raise corrupt(
            NAME, base,
            "val/ has no class subfolders: val must be sorted into val/<wnid>/*.JPEG, e.g. with valprep.sh",
        )
    if train_classes != val_classes:
        only_train = sorted(set(train_classes) - set(val_classes))
        only_val = sorted(set(val_classes) - set(train_classes))
        example = f"{only_train[0]} only in train" if only_train else f"{only_val[0]} only in val"
        raise corrupt(
            NAME, base,
            f"train/ has {len(train_classes)} class folders and val/ {len(val_classes)}, not the same set "
            f"({example}); class count mismatch",
        )
    check_count(NAME, base, "the number of classes", len(train_classes), EXPECTED_CLASSES)

    train = guarded(NAME, base, "scanning train/ with ImageFolder", lambda: ImageFolder(str(base / "train")))
    test = guarded(NAME, base, "scanning val/ with ImageFolder", lambda: ImageFolder(str(base / "val")))
    check_count(NAME, base, "the number of train images", len(train), EXPECTED_TRAIN)
    check_count(NAME, base, "the number of val (our test) images", len(test), EXPECTED_TEST)

    size = img_size or DEFAULT_SIZE
    train_tf, eval_tf = transfer_transforms(size)
    info = DatasetInfo(
        name=NAME, num_classes=len(train_classes), img_size=size, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        source=SOURCE,
    )
    return image_splits(train, test, train.targets, (train_tf, eval_tf), info)

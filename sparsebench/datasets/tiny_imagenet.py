"""`tiny-imagenet`: Tiny-ImageNet-200 (CS231n), 200 classes at native 64 px.

Layout under the data root (the extracted official zip)::

    tiny-imagenet-200/wnids.txt                      200 WordNet ids, one a line
    tiny-imagenet-200/words.txt                      wnid -> words (not needed)
    tiny-imagenet-200/train/<wnid>/images/*.JPEG     500 a class
    tiny-imagenet-200/train/<wnid>/<wnid>_boxes.txt  (not needed)
    tiny-imagenet-200/val/images/*.JPEG              10,000 images, one flat folder
    tiny-imagenet-200/val/val_annotations.txt        <file>\\t<wnid>\\t<x0>\\t<y0>\\t<x1>\\t<y1>

The official test split has no labels, so the labelled official *val* split is our test
split; our validation split is carved from train by `create_dataset`. Class indices follow
the sorted wnids (ImageFolder convention). Trained at 64 px with RandomCrop(64, padding=8)
+ RandomHorizontalFlip.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.utils import download_and_extract_archive

from sparsebench.datasets._checks import (
    check_count,
    check_listed_exist,
    corrupt,
    guarded,
    guarded_download,
    listdir,
    not_found,
    require_files,
)
from sparsebench.datasets.base import DatasetInfo, LoadedSplits, register_dataset
from sparsebench.datasets.transforms import small_image_transforms, image_splits

NAME = "tiny-imagenet"
FOLDER = "tiny-imagenet-200"
URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
NATIVE_SIZE = 64
EXPECTED_CLASSES = 200
EXPECTED_TRAIN = 100_000      # 500 a class
EXPECTED_TEST = 10_000        # the official val split, 50 a class
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
# per-channel statistics of the 100,000 training images
MEAN = (0.4802, 0.4481, 0.3975)
STD = (0.2770, 0.2691, 0.2821)
SOURCE = (
    "Tiny-ImageNet-200, Stanford CS231n, http://cs231n.stanford.edu/tiny-imagenet-200.zip; a "
    "downsampled subset of ImageNet, subject to the ImageNet terms of access "
    "(non-commercial research and education only)"
)


class ImageList(Dataset):
    """(path, label) pairs; yields ``(PIL RGB image, label)``."""

    def __init__(self, samples: Sequence[Tuple[str, int]]):
        self.samples = list(samples)
        self.targets = [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i):
        path, label = self.samples[i]
        with open(path, "rb") as f:
            img = Image.open(f).convert("RGB")
        return img, label


def _read_lines(base: Path, rel: str) -> List[str]:
    text = guarded(NAME, base, f"reading {rel}", lambda: (base / rel).read_text(encoding="utf-8"))
    return [line.strip() for line in text.splitlines() if line.strip()]


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan(base: Path) -> Tuple[List[str], List[Tuple[str, int]], List[Tuple[str, int]]]:
    """Check the layout under `base` and return (classes, train samples, test samples)."""
    require_files(NAME, base, "wnids.txt", "train", "val/images", "val/val_annotations.txt")
    wnids = _read_lines(base, "wnids.txt")
    if not wnids:
        raise corrupt(NAME, base, "wnids.txt is empty")
    if len(set(wnids)) != len(wnids):
        raise corrupt(NAME, base, "wnids.txt lists a class twice")
    check_count(NAME, base, "the number of classes in wnids.txt", len(wnids), EXPECTED_CLASSES)
    classes = sorted(wnids)
    class_to_idx = {c: i for i, c in enumerate(classes)}

    train_dirs = {n for n in listdir(base / "train") if (base / "train" / n).is_dir()}
    extra = sorted(train_dirs - set(classes))
    if extra:
        raise corrupt(NAME, base, f"train/{extra[0]} is a class folder not listed in wnids.txt (class count mismatch)")
    train: List[Tuple[str, int]] = []
    for wnid in classes:
        folder = base / "train" / wnid / "images"
        if not folder.is_dir():
            raise corrupt(NAME, base, f"missing train/{wnid}/images for a class listed in wnids.txt")
        names = sorted(n for n in listdir(folder) if _is_image(n))
        if not names:
            raise corrupt(NAME, base, f"train/{wnid}/images holds no images")
        train.extend((str(folder / n), class_to_idx[wnid]) for n in names)
    check_count(NAME, base, "the number of train images", len(train), EXPECTED_TRAIN)

    test: List[Tuple[str, int]] = []
    listed: List[str] = []
    for lineno, line in enumerate(_read_lines(base, "val/val_annotations.txt"), 1):
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise corrupt(NAME, base, f"val/val_annotations.txt line {lineno} is not '<file> <wnid> ...'")
        filename, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in class_to_idx:
            raise corrupt(NAME, base, f"val/val_annotations.txt line {lineno}: class {wnid} is not in wnids.txt")
        listed.append(filename)
        test.append((str(base / "val" / "images" / filename), class_to_idx[wnid]))
    if not test:
        raise corrupt(NAME, base, "val/val_annotations.txt lists no images")
    check_listed_exist(NAME, base, listed, listdir(base / "val" / "images"), "val/images/")
    check_count(NAME, base, "the number of val (our test) images", len(test), EXPECTED_TEST)
    return classes, train, test


@register_dataset("tiny-imagenet", "Tiny-ImageNet-200, 200 classes, 100k train / 10k test (official val), 3x64x64")
def load_tiny_imagenet(root: Path, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    root = Path(root)
    base = root / FOLDER
    if download and not base.is_dir():
        guarded_download(NAME, root, URL, lambda: download_and_extract_archive(URL, str(root), md5=MD5))
    if not base.is_dir():
        raise not_found(NAME, base, root)
    classes, train_samples, test_samples = scan(base)

    size = img_size or NATIVE_SIZE
    train_tf, eval_tf = small_image_transforms(NATIVE_SIZE, size)
    train = ImageList(train_samples)
    info = DatasetInfo(name=NAME, num_classes=len(classes), img_size=size, mean=MEAN, std=STD, source=SOURCE)
    return image_splits(train, ImageList(test_samples), train.targets, (train_tf, eval_tf), info)

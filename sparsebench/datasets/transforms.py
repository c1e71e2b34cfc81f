"""Shared transform builders and the dataset view that applies them.

Two recipes cover every image dataset:

* `small_image_transforms` -- datasets trained at (or near) their native low resolution
  (CIFAR at 32 px, Tiny-ImageNet at 64 px): train = RandomCrop(size, padding=size/8) +
  RandomHorizontalFlip, eval = the image as is. When `img_size` differs from the native
  size the image is first resized to `img_size`.
* `transfer_transforms` -- higher-resolution transfer datasets (Food-101, Flowers-102, Pets,
  ImageNet) at 224 px by default: train = RandomResizedCrop(size) + RandomHorizontalFlip,
  eval = Resize(int(size / 0.875)) + CenterCrop(size).

Both end with PILToTensor: a uint8 CHW tensor. The loader collates uint8 batches and normalises
them on the device by the dataset's `DatasetInfo.mean` / `std` (`training/loading.py`), as
ToTensor + Normalize would have per image.
"""
from __future__ import annotations

from typing import Callable, Tuple

from torch.utils.data import Dataset
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
EVAL_CROP_FRACTION = 0.875

Pair = Tuple[Callable, Callable]


def _to_tensor() -> list:
    return [T.PILToTensor()]


def small_image_transforms(native: int, img_size: int) -> Pair:
    """(train, eval) transforms for low-resolution datasets; pad = img_size // 8."""
    resize = [] if img_size == native else [T.Resize((img_size, img_size))]
    pad = max(1, img_size // 8)
    train = T.Compose(
        resize + [T.RandomCrop(img_size, padding=pad), T.RandomHorizontalFlip()] + _to_tensor()
    )
    evaluate = T.Compose(resize + _to_tensor())
    return train, evaluate


def transfer_transforms(img_size: int) -> Pair:
    """(train, eval) transforms for ImageNet-style datasets at `img_size` (default 224)."""
    train = T.Compose([T.RandomResizedCrop(img_size), T.RandomHorizontalFlip()] + _to_tensor())
    evaluate = T.Compose(
        [T.Resize(int(img_size / EVAL_CROP_FRACTION)), T.CenterCrop(img_size)] + _to_tensor()
    )
    return train, evaluate


class _RGB:
    """Convert a PIL image to RGB (grayscale / CMYK / palette images occur in the wild)."""

    def __call__(self, img):
        return img if getattr(img, "mode", "RGB") == "RGB" else img.convert("RGB")

    def __repr__(self) -> str:
        return "RGB()"


class Transformed(Dataset):
    """A view of `base` (which yields ``(PIL image, label)``) with its own transform.

    Lets the train split with augmentation and the same split with eval transforms share one
    underlying dataset object (one metadata parse, one CIFAR array in memory).
    """

    def __init__(self, base: Dataset, transform: Callable):
        self.base = base
        self.transform = transform
        self._rgb = _RGB()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i):
        img, target = self.base[i]
        return self.transform(self._rgb(img)), int(target)

    def __repr__(self) -> str:
        return f"Transformed({type(self.base).__name__}, n={len(self)})"


def image_splits(train: Dataset, test: Dataset, targets, transforms: Pair, info):
    """The loader result every image dataset returns: train twice (augmented / eval), test, labels."""
    import numpy as np

    from sparsebench.datasets.base import LoadedSplits

    train_tf, eval_tf = transforms
    return LoadedSplits(
        train=Transformed(train, train_tf),
        train_eval=Transformed(train, eval_tf),
        test=Transformed(test, eval_tf),
        targets=np.asarray(targets, dtype=np.int64),
        info=info,
    )

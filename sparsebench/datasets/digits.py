"""`digits`: scikit-learn's 8×8 handwritten digits as a small 3-channel image dataset.

The 1,797 images ship inside scikit-learn (UCI ML hand-written digits, CC BY 4.0), so the
default benchmark runs offline. Images are upsampled to `img_size` (default 16 px) and
replicated to three channels so that every model sees the same input layout as on the
real datasets. Digits has no official test split: a fixed stratified 25 % is held out with
seed 0, independent of the run seed, so every run tests on the same images.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sparsebench.datasets.base import DatasetInfo, LoadedSplits, register_dataset, stratified_split

TEST_FRACTION = 0.25
TEST_SPLIT_SEED = 0


class TensorImages(Dataset):
    """Images held in one tensor, with an optional per-sample tensor transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None):
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[i])


class RandomShift:
    """Random translation by up to `pad` pixels with zero fill (crop of a padded image)."""

    def __init__(self, pad: int, generator: Optional[torch.Generator] = None):
        self.pad = pad

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        p = self.pad
        h, w = x.shape[-2:]
        padded = F.pad(x, (p, p, p, p), value=float(x.min()))
        i, j = torch.randint(0, 2 * p + 1, (2,)).tolist()
        return padded[..., i : i + h, j : j + w]


@register_dataset("digits", "scikit-learn 8x8 handwritten digits, 10 classes, 3x16x16, offline")
def load_digits(root=None, img_size: Optional[int] = None, download: bool = False) -> LoadedSplits:
    from sklearn.datasets import load_digits as sk_load_digits

    img_size = img_size or 16
    bunch = sk_load_digits()
    pixels = torch.tensor(bunch.images, dtype=torch.float32) / 16.0          # (N, 8, 8) in [0, 1]
    images = F.interpolate(pixels[:, None], size=(img_size, img_size), mode="bilinear", align_corners=False)
    images = images.clamp(0, 1).repeat(1, 3, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.long)

    train_idx, test_idx = stratified_split(labels.numpy(), TEST_FRACTION, TEST_SPLIT_SEED)
    mean = float(images[train_idx].mean())
    std = float(images[train_idx].std())
    images = (images - mean) / std
    shift = RandomShift(pad=max(1, img_size // 8))
    train_images, train_labels = images[train_idx], labels[train_idx]
    info = DatasetInfo(
        name="digits",
        num_classes=10,
        img_size=img_size,
        mean=(mean,) * 3,
        std=(std,) * 3,
        source="scikit-learn load_digits (UCI ML hand-written digits), CC BY 4.0",
    )
    return LoadedSplits(
        train=TensorImages(train_images, train_labels, transform=shift),
        train_eval=TensorImages(train_images, train_labels),
        test=TensorImages(images[test_idx], labels[test_idx]),
        targets=train_labels.numpy(),
        info=info,
    )

"""Batches as timm's training script feeds them: uint8 from the workers, normalised on the device.

Image datasets yield uint8 CHW tensors (`datasets/transforms.py` ends with `PILToTensor`); the
workers collate them with timm's `fast_collate` into one uint8 batch, a quarter of a float32
batch in shared memory and in the host-to-device copy. `DeviceLoader` moves each batch to the
device (pinned memory and non-blocking copies on CUDA, the next batch copied on a side stream
while the current one trains, as timm's `PrefetchLoader` does) and normalises it there, so every
consumer (the trainer, its hooks, `evaluate`, a method's own look at a batch) sees float inputs
normalised as before. A dataset that yields float tensors (already normalised: `digits`) passes
through unchanged.

timm's `PrefetchLoader` itself is not used: it normalises every batch as uint8, with
(x − 255·mean) / (255·std), which is not bitwise `ToTensor` + `Normalize`; here a uint8 batch is
normalised as x / 255, − mean, / std, so on CPU a run computes exactly what it did when the
dataset normalised each image (the committed CPU results stay as they were). On CPU nothing is
fetched ahead either: with `workers=0` the augmentations draw from the global RNG, and drawing
the next batch's before the current step's forward would change every seeded result.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch.utils.data import DataLoader, default_collate


def batch_collate(batch):
    """timm's `fast_collate` for uint8 images (one preallocated uint8 batch), `default_collate` otherwise."""
    image = batch[0][0]
    if isinstance(image, torch.Tensor) and image.dtype == torch.uint8:
        from timm.data.loader import fast_collate

        return fast_collate(batch)
    return default_collate(batch)


class DeviceLoader:
    """A DataLoader's batches on `device`: uint8 images normalised by `mean` / `std` there.

    Iterates like the loader it wraps (length, dataset, sampler, batch size and generator are the loader's, so
    `LoaderPosition` records and restores its position). On CUDA the wrapped loader should pin
    memory (`loader_kwargs`); the copy of batch k+1 then overlaps the training step on batch k.
    """

    def __init__(self, loader: DataLoader, device, mean: Sequence[float], std: Sequence[float]):
        self.loader, self.device = loader, torch.device(device)
        shape = (1, len(mean), 1, 1)
        # float32 from the same Python floats as torchvision's Normalize; moved to the device on first use
        self.mean = torch.tensor(tuple(mean), dtype=torch.float32).view(shape)
        self.std = torch.tensor(tuple(std), dtype=torch.float32).view(shape)
        self._stream: Optional[torch.cuda.Stream] = None

    def __len__(self) -> int:
        return len(self.loader)

    @property
    def dataset(self):
        return self.loader.dataset

    @property
    def sampler(self):
        return self.loader.sampler

    @property
    def batch_size(self) -> Optional[int]:
        return self.loader.batch_size

    @property
    def generator(self) -> Optional[torch.Generator]:
        return getattr(self.loader, "generator", None)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """A uint8 batch on the device as float32, normalised as `ToTensor` + `Normalize` would."""
        if images.dtype != torch.uint8:
            return images
        if self.mean.device != images.device:
            self.mean, self.std = self.mean.to(images.device), self.std.to(images.device)
        return images.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def _to_device(self, batch):
        x, y = batch
        x = x.to(self.device, non_blocking=True)
        y = y.to(self.device, non_blocking=True)
        return self.normalise(x), y

    def __iter__(self):
        if self.device.type != "cuda":
            for batch in self.loader:
                yield self._to_device(batch)
            return
        # One stream for the loader's lifetime (timm's PrefetchLoader): the caching allocator keeps
        # blocks per stream, so a stream per epoch would strand every earlier epoch's blocks.
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=self.device)
        ready = None
        for batch in self.loader:
            consumer = torch.cuda.current_stream(self.device)
            # memory the consumer freed may be reused below: let its queued work finish first
            self._stream.wait_stream(consumer)
            with torch.cuda.stream(self._stream):
                upcoming = self._to_device(batch)
            if ready is not None:
                yield ready
            torch.cuda.current_stream(self.device).wait_stream(self._stream)
            for t in upcoming:
                t.record_stream(torch.cuda.current_stream(self.device))
            ready = upcoming
        if ready is not None:
            yield ready


# Batch size of every evaluation pass (validation, test, re-evaluation of a saved model): one value, so a
# model evaluated later sees its test split in the batches the run saw.
EVAL_BATCH = 256


def loader_kwargs(device) -> dict:
    """DataLoader arguments for batches bound for `device`: uint8 collation; pinned memory on CUDA."""
    return {"collate_fn": batch_collate, "pin_memory": torch.device(device).type == "cuda"}


def device_loader(dataset, device, mean: Sequence[float], std: Sequence[float], **kwargs) -> DeviceLoader:
    """A `DataLoader` over `dataset` (`kwargs` as DataLoader takes them) whose batches arrive on `device`."""
    return DeviceLoader(DataLoader(dataset, **loader_kwargs(device), **kwargs), device, mean, std)

"""Mid-run resume: where a run's fits save their state, the process RNGs, the data position.

Every `Trainer.fit` of a run gets the next sequence number from the run's `RunCheckpoints`.
The fit saves `fit-<k>.pt` every `every` steps and when it ends (marked completed). When a
killed run is started again, the same deterministic code calls the same fits in the same
order: a fit whose file says completed loads its end state and returns its saved result at
once; a partial one loads and trains on from there; code between fits (a prune-back, a
compaction) simply runs again on the loaded state. With the same seed the result is the
one an uninterrupted run gets, bitwise on CPU with `workers=0` (tests/training/test_resume.py).
"""
from __future__ import annotations

import io
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader

from sparsebench.platform import current as current_platform


class ResumeMismatch(RuntimeError):
    """A checkpoint was written by a different sequence of fits (other code or settings)."""


class RunCheckpoints:
    """The checkpoint directory of one run (or one dense pretrain) and its fit counter.

    `every`: optimizer steps between mid-fit checkpoints (None: only at the end of each fit).
    """

    def __init__(self, directory: Path, every: Optional[int] = None):
        if every is not None and every < 1:
            raise ValueError(f"checkpoint every={every} must be >= 1 or None")
        self.directory, self.every = Path(directory), every
        self.fits = 0                 # fit calls so far in this process
        self.resumed = 0              # fits loaded from a checkpoint
        self.restored_seconds = 0.0   # training wall time spent by earlier processes, as loaded

    def next_fit(self) -> int:
        index, self.fits = self.fits, self.fits + 1
        return index

    def path(self, index: int) -> Path:
        return self.directory / f"fit-{index}.pt"

    def save(self, index: int, state: dict) -> None:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        current_platform().write_bytes(self.path(index), buffer.getvalue())   # the primary's copy is every rank's

    def load(self, index: int) -> Optional[dict]:
        path = self.path(index)
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def clear(self) -> None:
        """Delete the directory (after the run's record, or the dense checkpoint, is written)."""
        if current_platform().is_primary:
            shutil.rmtree(self.directory, ignore_errors=True)


def rng_state() -> dict:
    """torch (CPU and every CUDA device), numpy and python `random` states, weights_only-loadable."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
        "python": random.getstate(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
    }
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class LoaderPosition:
    """An endless iterator over a loader's epochs that can record and restore where it is.

    It keeps the loader generator's state at the start of the current epoch and the number
    of batches taken from it. Restoring rewinds the generator, starts the epoch, takes the
    same number of batches again (so workers and augmentations are where they were), then
    sets the generator to the state it had at saving: trainers sharing the loader see the
    same order as in an uninterrupted run.
    """

    def __init__(self, loader: DataLoader):
        self.loader = loader
        self.generator: Optional[torch.Generator] = getattr(loader, "generator", None)
        self._it = None
        self.epoch_state: Optional[torch.Tensor] = None
        self.batches = 0

    def __iter__(self):
        return self

    def _start_epoch(self) -> None:
        self.epoch_state = self.generator.get_state() if self.generator is not None else None
        self._it = iter(self.loader)
        self.batches = 0

    def __next__(self):
        for _ in range(2):
            if self._it is None:
                self._start_epoch()
            try:
                batch = next(self._it)
            except StopIteration:
                self._it = None
                continue
            self.batches += 1
            return batch
        raise RuntimeError("the training loader yields no batches")

    def state_dict(self) -> dict:
        return {"in_epoch": self._it is not None, "epoch_state": self.epoch_state, "batches": self.batches,
                "generator": self.generator.get_state() if self.generator is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self._it = None
        if state["in_epoch"]:
            if self.generator is not None and state["epoch_state"] is not None:
                self.generator.set_state(state["epoch_state"])
            self._start_epoch()
            for _ in range(state["batches"]):
                next(self._it)
            self.batches = state["batches"]
            self.epoch_state = state["epoch_state"]
        if self.generator is not None and state["generator"] is not None:
            self.generator.set_state(state["generator"])


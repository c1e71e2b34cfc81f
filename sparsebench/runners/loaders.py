"""The lifetimes of a run's DataLoader workers, and how much shared memory their prefetching may hold.

A run builds one train loader per phase (dense, method, fine-tune) plus val and test. With
`persistent_workers` a loader keeps its worker processes, and every batch they prefetched, for as
long as the loader lives; a train loader left mid-epoch when its phase ends holds
`workers × prefetch_factor` batches in `/dev/shm` (float32 224 px at batch 1024 and 16 workers:
≈ 19.7 GB) for the rest of the run. Here:

- a run's loaders form a `RunLoaders` group: when a train loader starts that is not the one in use,
  every other loader of the run gives its workers back first, so at most one train loader (and the
  val loader its fits evaluate on) holds workers at a time;
- the pipeline calls `RunLoaders.release()` at the end of every training stage, so evaluation,
  measurement and saving run with no worker holding prefetched batches;
- the test loader (one pass per stage) is not persistent: its workers end with its epoch;
- `prefetch_plan` bounds `workers × prefetch_factor × batch bytes` of the loaders that can be live
  together to a fraction of `/dev/shm`, lowering `prefetch_factor` (which changes no result) and
  refusing the run with one line where even one prefetched batch per worker would not fit.
"""
from __future__ import annotations

import logging
import shutil
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from sparsebench.specs import SpecError
from sparsebench.training.loading import DeviceLoader
from sparsebench.training.rank_data import RankAugmentedLoader

SHM_PATH = Path("/dev/shm")
# One run's live loaders may fill at most this share of /dev/shm (split over a host's DDP ranks): the
# rest is for whatever else shares the machine. (A GPU sweep runs one run per GPU, each with its own
# workers: `data.workers` is sized per GPU in the paper suites.)
SHM_FRACTION = 0.75
DEFAULT_PREFETCH = 2          # torch's own default prefetch_factor

log = logging.getLogger("sparsebench")


def _data_loader(loader) -> DataLoader:
    """The DataLoader itself, also where a `DeviceLoader` wraps it."""
    return loader.loader if isinstance(loader, DeviceLoader) else loader


def release_workers(loader) -> None:
    """Shut down a loader's persistent worker processes, and free the batches they prefetched.
    The loader stays usable: its next epoch starts fresh workers."""
    loader = _data_loader(loader)
    iterator = getattr(loader, "_iterator", None)
    if iterator is None:
        return
    loader._iterator = None
    shutdown = getattr(iterator, "_shutdown_workers", None)     # single-process iterators have none
    if shutdown is not None:
        shutdown()


class RunLoader(DataLoader):
    """A DataLoader of a `RunLoaders` group; a train loader tells the group when it starts an epoch."""

    def __init__(self, *args, group: "RunLoaders", train: bool, **kwargs):
        super().__init__(*args, **kwargs)
        # weak: no reference cycle, so a dropped group's loaders (and their workers) go at once, as plain ones do
        self._group, self.train = weakref.ref(group), train

    def __iter__(self):
        group = self._group()
        if self.train and group is not None:
            group.starting(self)
        return super().__iter__()


class RankRunLoader(RunLoader, RankAugmentedLoader):
    """A train loader of a run under torchrun: a member of the run's group (worker lifetimes) that draws
    this rank's own augmentations (`training.rank_data`)."""


class RunLoaders(dict):
    """`{name: loader}` for one run, with at most one train loader holding workers at a time."""

    def __init__(self, *args, plan: Optional["PrefetchPlan"] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.plan = plan
        self._training: Optional[DataLoader] = None

    def starting(self, loader: DataLoader) -> None:
        """A train loader starts an epoch: if it is not the one in use, the others give their workers back
        (a new phase; the val loader's idle workers are restarted by the new phase's first evaluation)."""
        if loader is self._training:
            return
        for other in self.values():
            if _data_loader(other) is not loader:
                release_workers(other)
        self._training = loader

    def release(self) -> None:
        """Every loader gives its workers back (the end of a training stage, or of the run)."""
        for loader in self.values():
            release_workers(loader)
        self._training = None


@dataclass(frozen=True)
class PrefetchPlan:
    """How many batches each worker may prefetch, and why (stored in the record's `data.loader`)."""
    workers: int
    prefetch_factor: int
    batch_bytes: int               # one train batch plus one evaluation batch, as the loaders yield them
    prefetch_bytes: int            # workers × prefetch_factor × batch_bytes: the live loaders' most
    shm_bytes: Optional[int]       # /dev/shm's size; None where there is none
    budget_bytes: Optional[int]

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def shm_size(path: Path = SHM_PATH) -> Optional[int]:
    """The size of the shared-memory filesystem worker batches travel through, or None without one."""
    try:
        return shutil.disk_usage(path).total if path.is_dir() else None
    except OSError:
        return None


def sample_bytes(dataset: Dataset) -> int:
    """Bytes of one sample in a collated batch: its tensors as the dataset yields them (float32 or uint8
    images), a Python number as the int64 / float64 it is collated to."""
    sample = dataset[0]
    items = sample if isinstance(sample, (tuple, list)) else (sample,)
    return sum(t.element_size() * t.numel() if isinstance(t, torch.Tensor) else 8 for t in items)


def prefetch_plan(train: Dataset, batch_size: int, eval_batch: int, workers: int, ranks: int = 1,
                  shm_bytes: Optional[int] = None) -> PrefetchPlan:
    """The prefetch factor for a run's loaders: torch's default where `workers × prefetch × (train batch +
    evaluation batch)` fits `SHM_FRACTION` of /dev/shm (one train loader and the val loader are live at
    once, `RunLoaders`), else fewer batches in flight; a `SpecError` where one batch per worker is too many."""
    if shm_bytes is None:
        shm_bytes = shm_size()
    per_sample = sample_bytes(train)
    batch_bytes = per_sample * (batch_size // max(1, ranks) + eval_batch)
    if shm_bytes is None:
        return PrefetchPlan(workers, DEFAULT_PREFETCH, batch_bytes, workers * DEFAULT_PREFETCH * batch_bytes, None, None)
    budget = int(shm_bytes * SHM_FRACTION / max(1, ranks))
    prefetch = min(DEFAULT_PREFETCH, budget // max(1, workers * batch_bytes))
    if prefetch < 1:
        raise SpecError(
            f"data.workers={workers} with batch_size={batch_size}: one prefetched batch per worker needs "
            f"{_gb(workers * batch_bytes)} of shared memory, more than {SHM_FRACTION:g} of /dev/shm ({_gb(shm_bytes)}"
            f"{f' over {ranks} processes' if ranks > 1 else ''}); allowed: data.workers <= "
            f"{max(0, budget // batch_bytes)}, or a larger /dev/shm (docker: --shm-size)")
    if prefetch < DEFAULT_PREFETCH:
        log.warning("sparsebench: warning: prefetch_factor lowered to %d: %d workers × %d batches of %s would "
                    "exceed %g of /dev/shm (%s)", prefetch, workers, DEFAULT_PREFETCH, _gb(batch_bytes),
                    SHM_FRACTION, _gb(shm_bytes))
    return PrefetchPlan(workers, int(prefetch), batch_bytes, int(workers * prefetch * batch_bytes), shm_bytes, budget)


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def loader_arguments(plan: Optional[PrefetchPlan], persistent: bool) -> Dict[str, object]:
    """The DataLoader worker arguments of one of a run's loaders."""
    if plan is None or plan.workers == 0:
        return {"num_workers": 0}
    return {"num_workers": plan.workers, "persistent_workers": persistent, "prefetch_factor": plan.prefetch_factor}


"""What each rank of a DDP run reads: its own share of an evaluation split, and augmentations drawn
from its own random stream.

- `RankShard`: rank `r` of `n` evaluates samples `r, r + n, r + 2n, ...` of a split, each sample on
  exactly one rank (no padding duplicates); `evaluate` sums the ranks' correct counts, losses and
  sample counts, so the accuracy is the single-process one, every sample counted once.
- `RankAugmentedLoader`: the training loader of a DDP run. Every rank shares the loader generator
  (the permutation `RankSlices` splits must be the same everywhere), so every rank's workers were
  seeded alike and drew the same crops and flips. Here each rank's augmentation randomness is its
  own: a worker's seed, and in the main process (`workers=0`) a separate stream swapped in around
  each batch, are the loader's per-epoch seed plus `rank × AUGMENTATION_SEED_STRIDE`. Rank 0 keeps
  the loader's own seed. The process's global RNGs (dropout, a method's random draws) are not
  advanced by the augmentations, so they stay the same on every rank. Both are reseeded from the
  loader generator at each epoch, so a resume that replays an epoch's batches (`LoaderPosition`)
  restores them on every rank. A single process never uses either: its loaders are as before.
"""
from __future__ import annotations

import functools
import random
from typing import Iterator, List, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from sparsebench.platform import gather_from_ranks, sum_over_ranks

# Odd and large in its low 32 bits (torch's CPU generator keeps only those of a seed): ranks' seeds,
# and a rank's workers' seeds (`seed + worker id`), never coincide.
AUGMENTATION_SEED_STRIDE = 0x9E3779B9


class RankShard(Sampler):
    """Indices `rank, rank + world_size, ...` of a dataset of `size` samples, in order."""

    def __init__(self, size: int, rank: int, world_size: int):
        self.size, self.rank, self.world_size = size, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.size, self.world_size))

    def totals(self, *numbers: float) -> List[float]:
        """Each number summed over the ranks (correct counts, loss sums, sample counts)."""
        return sum_over_ranks(list(numbers))

    def in_order(self, values: torch.Tensor) -> torch.Tensor:
        """Per-sample values of this rank's shard → those of the whole split in dataset order."""
        shards = gather_from_ranks(values.cpu())
        out = torch.empty(self.size, dtype=values.dtype)
        for rank, shard in enumerate(shards):
            out[rank::self.world_size] = shard
        return out


def sharded(loader: DataLoader):
    """The loader's `RankShard`, or None where the loader reads the whole split."""
    sampler = getattr(loader, "sampler", None)
    return sampler if isinstance(sampler, RankShard) else None


def rank_seed(seed: int, rank: int) -> int:
    return (int(seed) + rank * AUGMENTATION_SEED_STRIDE) % 2 ** 63


def reseed_worker(rank: int, worker_id: int) -> None:
    """A DataLoader worker's `worker_init_fn`: torch, python and numpy reseeded for this rank
    (torch seeded the worker with the shared `base seed + worker id`)."""
    seed = rank_seed(torch.initial_seed(), rank)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


RandomStates = Tuple[torch.Tensor, tuple, tuple]


def _states() -> RandomStates:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def _set_states(states: RandomStates) -> None:
    torch.set_rng_state(states[0])
    random.setstate(states[1])
    np.random.set_state(states[2])


class _OwnRandomness:
    """Batches of a main-process loader iterator, each fetched with this rank's random stream in place
    of the process's global ones (which are left as they were)."""

    def __init__(self, batches, seed: int):
        self.batches = batches
        outer = _states()
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % 2 ** 32)
        self.states = _states()
        _set_states(outer)

    def __iter__(self):
        return self

    def __next__(self):
        outer = _states()
        _set_states(self.states)
        try:
            return next(self.batches)
        finally:
            self.states = _states()
            _set_states(outer)

    def __len__(self) -> int:
        return len(self.batches)


class RankAugmentedLoader(DataLoader):
    """A DataLoader whose augmentations draw from this rank's own random stream (module docstring)."""

    def __init__(self, *args, rank: int, **kwargs):
        if kwargs.get("num_workers", 0) > 0 and rank:
            kwargs["worker_init_fn"] = functools.partial(reseed_worker, rank)
        super().__init__(*args, **kwargs)
        self.rank = rank

    def __iter__(self):
        batches = super().__iter__()
        if self.num_workers > 0:
            return batches               # its workers are seeded for this rank
        return _OwnRandomness(batches, rank_seed(batches._base_seed, self.rank))

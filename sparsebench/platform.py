"""The platform a process runs on: its rank, the world size, whether it is the primary, barriers,
its device, and the file writes only the primary makes (OpenLTH's platform object).

Local by default (rank 0 of 1). When `torch.distributed` is initialised (a `torchrun` launch,
or `init_distributed()` reading the torchrun environment variables), every answer comes from
the process group: rank 0 is the primary; records, dense checkpoints and mid-fit checkpoints are
written by it alone (`write_bytes`), and the others wait at `barrier()` where they must.

This module sits in the bottom layer (it needs only torch) so the store, the trainer and the
runners all ask it, never `torch.distributed` or a bare file write.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Platform:
    """Where this process sits among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_primary(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def device(self, requested: str = "cpu") -> torch.device:
        """The device this rank trains on: `cuda` becomes `cuda:<local rank>` under torchrun."""
        device = torch.device(requested)
        if device.type == "cuda" and self.distributed and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def broadcast(self, obj: Any) -> Any:
        """The primary's `obj` on every rank (a decision all ranks must share)."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def write_bytes(self, path: Path, data: bytes) -> bool:
        """Atomic write by the primary only; True where this process wrote."""
        if not self.is_primary:
            return False
        atomic_write_bytes(Path(path), data)
        return True

    def write_text(self, path: Path, text: str) -> bool:
        return self.write_bytes(path, text.encode())

    @contextlib.contextmanager
    def primary_lock(self, path: Path) -> Iterator[None]:
        """The file lock, taken by the primary only: the other ranks of one run follow it in step
        (they train together), so they must not queue behind it."""
        if self.is_primary:
            with file_lock(path):
                yield
        else:
            yield


def current() -> Platform:
    """The platform of this process, read from torch.distributed each time (cheap)."""
    if dist.is_available() and dist.is_initialized():
        return Platform(rank=dist.get_rank(), world_size=dist.get_world_size(),
                        local_rank=int(os.environ.get("LOCAL_RANK", dist.get_rank())), distributed=True)
    return Platform()


def init_distributed(device: str = "cpu", timeout_s: float = 1800.0) -> Platform:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, MASTER_ADDR, ...); nothing
    happens without those variables or when already initialised. gloo on CPU, nccl on CUDA."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return current()


# --- the file primitives every write goes through -------------------------------------------------
def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())     # mkstemp makes 0600; a shared results dir needs the umask's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask only sets)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """An exclusive advisory lock; yields False (without waiting) when `blocking` is off and
    another process holds it. The kernel drops it when its holder dies, even by SIGKILL."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


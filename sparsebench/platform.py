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
import errno
import fcntl
import hashlib
import json
import logging
import mmap
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

log = logging.getLogger("sparsebench")


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
    def primary_lock(self, path: Path, **wait) -> Iterator[None]:
        """The file lock, taken by the primary only: the other ranks of one run follow it in step
        (they train together), so they must not queue behind it. `wait`: `file_lock`'s timeout, what."""
        if self.is_primary:
            with file_lock(path, **wait):
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


# --- answers every rank shares (one process: its own answer) --------------------------------------
def _collective_device() -> torch.device:
    """Where a collective's tensors must live: the rank's GPU under nccl, the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any (an all-reduce MAX of 0/1). A condition one rank
    meets alone (a non-finite loss) must end every rank at the same step: a rank that raised alone
    would leave the others waiting in the next gradient all-reduce until the process-group timeout."""
    if not current().distributed:
        return bool(flag)
    box = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def sum_over_ranks(numbers: list) -> list:
    """The element-wise sum of `numbers` over every rank (float64; each rank passes as many)."""
    if not current().distributed:
        return list(numbers)
    box = torch.tensor([float(v) for v in numbers], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(box, op=dist.ReduceOp.SUM)
    return box.tolist()


def mean_over_ranks(tensors: list) -> list:
    """Each tensor averaged over every rank (the same shapes on each; one all-reduce for all of them),
    as new tensors on their own devices; in one process, the tensors as they are. For choices made
    from per-rank scores (each rank saw its own part of the batch) that every rank must make alike."""
    if not current().distributed or not tensors:
        return list(tensors)
    flat = torch.cat([t.detach().reshape(-1).to(torch.float64) for t in tensors]).to(_collective_device())
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    out, at = [], 0
    for t in tensors:
        out.append(flat[at:at + t.numel()].view(t.shape).to(device=t.device, dtype=t.dtype))
        at += t.numel()
    return out


def gather_from_ranks(obj: Any) -> list:
    """Every rank's `obj`, in rank order, on every rank (`[obj]` in one process)."""
    if not current().distributed:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


# --- the file primitives every write goes through -------------------------------------------------
class StorageError(OSError):
    """A write the file system refused (full, read-only, no permission): one line naming what was
    being written and where. Nothing partial is left behind (the temp file is removed)."""

    def __init__(self, message: str, errno_: int = 0):
        super().__init__(errno_, message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):              # crosses process boundaries (pool workers) intact
        return (type(self), (self.message, self.errno))


# The errors that say the file system refuses writes altogether (any other OSError is one run's problem).
WRITE_REFUSED = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


def release_memory() -> None:
    """Give memory a finished run freed back to the system: collect garbage (cycles a run's trainers and
    hooks leave), return glibc's free heap (`malloc_trim`: without it, a process that trained a large
    run keeps its high-water mark resident; P-GaP's four ResNet-50 replicas left 14 GB in a process that
    went on to other runs) and, where CUDA is in use, the caching allocator's unused blocks."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):          # not glibc: nothing to trim
        pass
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def refused(e: BaseException) -> bool:
    return isinstance(e, OSError) and not isinstance(e, StorageError) and e.errno in WRITE_REFUSED


def storage_error(e: OSError, operation: str, path: Path) -> StorageError:
    code = errno.errorcode.get(e.errno, "") if e.errno else ""
    reason = (e.strerror or type(e).__name__) + (f" [{code}]" if code else "")
    return StorageError(f"cannot {operation} {path}: {reason}", e.errno or 0)


def what_is(path: Path) -> str:
    """What a file under a results folder is, for error lines: record, checkpoint, report or file."""
    path = Path(path)
    if path.suffix == ".pt":
        return "checkpoint"
    if path.parent.name == "records" and path.suffix == ".json":
        return "record"
    if path.suffix in (".md", ".csv", ".html", ".svg", ".png", ".pdf", ".js", ".css"):
        return "report"
    return "file"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers never see half a file.
    A failed write removes the temp file; a refused one (ENOSPC, EROFS, EACCES, ...) raises `StorageError`."""
    path = Path(path)
    what = what_is(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        if refused(e):
            raise storage_error(e, f"write {what}", path) from None
        raise
    try:
        os.fchmod(fd, 0o666 & ~current_umask())     # mkstemp makes 0600; a shared results dir needs the umask's mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if refused(e):
            raise storage_error(e, f"write {what}", path) from None
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


class LockTimeout(TimeoutError):
    """A lock was not free within the time allowed; the message says which, held by whom, since when."""

    def __init__(self, message: str, path: str = "", holder: Optional["LockHolder"] = None):
        super().__init__(message)
        self.message, self.path, self.holder = message, path, holder

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):
        return (type(self), (self.message, self.path, self.holder))


PROCESS_STATES = {"R": "running", "S": "sleeping", "D": "in uninterruptible I/O", "T": "stopped",
                  "t": "stopped by a debugger", "Z": "zombie", "X": "dead", "I": "idle", "P": "parked"}


@dataclass(frozen=True)
class LockHolder:
    """Who took a lock, as its file records it: pid, host and when (epoch seconds)."""

    pid: int
    host: str
    since: float

    @classmethod
    def me(cls) -> "LockHolder":
        return cls(os.getpid(), socket.gethostname(), time.time())

    def local(self) -> bool:
        return self.host == socket.gethostname()

    def state(self) -> str:
        """The holder's process state from /proc (running, sleeping, stopped, zombie, ...)."""
        if not self.local():
            return "state unknown (another host)"
        try:
            with open(f"/proc/{self.pid}/stat") as f:
                code = f.read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            return "no such process"
        except (OSError, IndexError):
            return "state unknown"
        return PROCESS_STATES.get(code, f"state {code}")

    def describe(self, now: Optional[float] = None) -> str:
        now = time.time() if now is None else now
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.since))
        return f"held by pid {self.pid} on {self.host} ({self.state()}) since {when} ({now - self.since:.0f} s ago)"


def lock_holder(path: Path) -> Optional[LockHolder]:
    """The holder a lock file records, or None (never taken, unreadable, or an older format)."""
    try:
        raw = json.loads(Path(path).read_text() or "null")
        return LockHolder(int(raw["pid"]), str(raw["host"]), float(raw["since"]))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _holder_text(path: Path) -> str:
    holder = lock_holder(path)
    return holder.describe() if holder is not None else "held by a process that did not record itself"


LOCK_POLL_S = 0.2
LOCK_NOTICE_S = 5.0          # a blocking wait says what it waits for after this long, then every minute


@contextlib.contextmanager
def file_lock(path: Path, blocking: bool = True, timeout: Optional[float] = None, what: str = "",
              notice_after: Optional[float] = LOCK_NOTICE_S) -> Iterator[bool]:
    """An exclusive advisory lock; the kernel drops it when its holder dies, even by SIGKILL, so a
    dead holder's lock is simply taken. The file records the holder (pid, host, start time).

    `blocking` off: yields False at once when another process holds it. Blocking: polls; after
    `notice_after` seconds logs one line saying which lock, held by whom, in what process state,
    since when (then once a minute); after `timeout` seconds raises `LockTimeout`, leaving the
    lock to its holder."""
    path = Path(path)
    what = f"{what} lock" if what else "lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        if refused(e):
            raise storage_error(e, f"take {what}", path) from None
        raise
    with f:
        start = time.monotonic()
        next_notice = notice_after
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
            waited = time.monotonic() - start
            if timeout is not None and waited >= timeout:
                raise LockTimeout(f"gave up after {waited:.0f} s waiting for {what} {path}, {_holder_text(path)}; "
                                  f"left to its holder", str(path), lock_holder(path))
            if next_notice is not None and waited >= next_notice:
                log.warning("sparsebench: waiting %.0f s for %s %s, %s", waited, what, path, _holder_text(path))
                next_notice = waited + 60.0
            time.sleep(LOCK_POLL_S)
        try:
            with contextlib.suppress(OSError):       # who holds it, for those who wait (a full disk must not stop the lock)
                f.seek(0)
                f.truncate()
                me = LockHolder.me()
                f.write(json.dumps({"pid": me.pid, "host": me.host, "since": round(me.since, 3)}))
                f.flush()
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


# --- the timing section --------------------------------------------------------------------------
HOLD_RENEW_S = 1.0        # a working process passes the gate again at least this often, flag or not
IDLE_RELEASE_S = 0.5      # a process outside any step this long lets its hold go
WATCH_S = 0.02            # how often a holding process looks for a timer while it is between steps


class TimingSection:
    """A section shared by every process that trains into one results store on one host, so that a
    latency measurement runs while no other worker computes.

    Work (each training step, each evaluation batch) holds it shared; timing holds it exclusive.
    Timing first closes a gate that new work must pass, then waits for the steps in flight to end,
    so the other workers pause at their next step boundary and resume when the timing is done; a
    stream of short steps cannot starve it (`flock` alone prefers no one). Two `flock` files:
    `<path>.gate.lock` and `<path>.lock`; the kernel drops a dead holder's locks, so a killed worker
    never leaves the others paused. `paused_seconds` is how long this process waited for others'
    timing (a fit takes it out of its wall time: a method's cost is not another run's latency).

    The locks are not taken per step: `flock` on the network file system a shared `--out` lives on
    costs about a millisecond a call, beside 5 ms steps. A working process passes the gate once and
    keeps its shared hold across steps; a timer, once it has closed the gate, raises a flag in shared
    memory on this host (`flag_path`: a byte, read per step for nanoseconds), and each worker lets its
    hold go at its next step (or at once when between steps: a watch thread) and queues at the gate.
    Should a worker miss the flag, its hold still goes within `HOLD_RENEW_S` of steps or
    `IDLE_RELEASE_S` outside them, so a timer waits at most that long.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.paused_seconds = 0.0
        self._pid = None
        self._files = None
        self._depth = 0

    def _open(self):
        """This process's lock files, flag and state (a forked child starts afresh: the parent's hold
        and watch thread are not its own)."""
        if self._pid != os.getpid():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._pid = os.getpid()
            self._files = (open(self.path.with_name(self.path.name + ".gate.lock"), "a+"),
                           open(self.path.with_name(self.path.name + ".lock"), "a+"))
            self._flag = _open_flag(flag_path(self.path))
            self._mutex = threading.Lock()   # the hold: between this thread's steps and the watch thread
            self._held = False
            self._held_since = self._last_work = 0.0
            self._depth = 0
            self._watching = False
        return self._files

    def _announced(self) -> bool:
        """A timer has closed the gate (or, with no flag on this host, may have)."""
        return self._flag is None or self._flag[0] != 0

    @contextlib.contextmanager
    def work(self) -> Iterator[None]:
        """Around one step of work: waits while another process times, then holds the section shared."""
        if self._depth:                      # nested (an evaluation inside a step): already held
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        self._open()
        with self._mutex:
            if not self._held or self._announced() or time.monotonic() - self._held_since > HOLD_RENEW_S:
                self._pass_gate()
            self._depth = 1
        try:
            yield
        finally:
            self._last_work = time.monotonic()
            self._depth = 0

    def _pass_gate(self) -> None:
        """Let this process's hold go, pass the gate (waiting while a timer holds it), hold shared again."""
        gate, lock = self._files
        start = time.perf_counter()
        self._release()
        fcntl.flock(gate, fcntl.LOCK_SH)
        try:
            fcntl.flock(lock, fcntl.LOCK_SH)
            self._held, self._held_since = True, time.monotonic()
            if self._flag is not None and self._flag[0]:
                _raise_flag(self._flag, 0)   # a timer killed mid-way left it: no timer is past the gate we hold
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)
        self.paused_seconds += time.perf_counter() - start
        if not self._watching:
            self._watching = True
            threading.Thread(target=self._watch, args=(os.getpid(),), name="sparsebench-timing-watch",
                             daemon=True).start()

    def _release(self) -> None:
        if self._held:
            fcntl.flock(self._files[1], fcntl.LOCK_UN)
            self._held = False

    def _watch(self, pid: int) -> None:
        """Between steps (a stage's set-up, a checkpoint, the next run's data): the hold goes as soon as a
        timer raises the flag, or after `IDLE_RELEASE_S` without a step."""
        while True:
            time.sleep(WATCH_S)
            with self._mutex:
                if self._pid != pid or self._files is None:
                    return                   # closed: the next use opens afresh (and watches anew)
                if self._held and not self._depth and (
                        self._announced() or time.monotonic() - self._last_work > IDLE_RELEASE_S):
                    self._release()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[bool]:
        """The section alone (yields True): every other process's work waits until it is left."""
        if self._depth:
            raise RuntimeError("timing inside a step of work would wait for itself")
        gate, lock = self._open()
        with self._mutex:
            self._release()
        fcntl.flock(gate, fcntl.LOCK_EX)
        try:
            _raise_flag(self._flag, 1)       # the holders let go at their next step
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                try:
                    yield True
                finally:
                    fcntl.flock(lock, fcntl.LOCK_UN)
            finally:
                _raise_flag(self._flag, 0)
        finally:
            fcntl.flock(gate, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._pid == os.getpid() and self._files is not None:
            with self._mutex:
                self._release()
                for f in self._files:
                    f.close()
                if self._flag is not None:
                    self._flag.close()
                self._files = self._flag = None
        self._pid = self._files = None


def flag_path(path: Path) -> Path:
    """The shared-memory flag of the section at `path` on this host: in /dev/shm (else the temp folder),
    named by the section's real path, so every process of this host that uses the section finds it
    whatever the path it was given. One 8-byte file per results store, left in place (a process may
    have it mapped)."""
    key = hashlib.sha256(os.path.realpath(path).encode()).hexdigest()[:20]
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    return Path(folder) / f"sparsebench-timing-{key}"


def _open_flag(path: Path) -> Optional[mmap.mmap]:
    """The flag mapped shared, writable where allowed (another user's flag: read only); None where it
    cannot be opened at all (then every step passes the gate, as if a timer were always announced)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        access = mmap.ACCESS_WRITE
    except OSError:
        try:
            fd = os.open(path, os.O_RDONLY)
            access = mmap.ACCESS_READ
        except OSError:
            return None
    try:
        if access == mmap.ACCESS_WRITE and os.fstat(fd).st_size < 8:
            os.ftruncate(fd, 8)              # grows a new file only: ftruncate keeps a set flag's byte
        return mmap.mmap(fd, 8, access=access)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def _raise_flag(flag: Optional[mmap.mmap], value: int) -> None:
    if flag is not None:
        with contextlib.suppress(TypeError):       # read only (another user's): the holders renew anyway
            flag[0] = value


class _NoSection:
    """Outside a results store's run (a test, a bare `Trainer`): work never waits, timing is not exclusive."""

    paused_seconds = 0.0

    def work(self):
        return contextlib.nullcontext()

    def exclusive(self):
        return contextlib.nullcontext(False)


_timing_section = [_NoSection()]


def timing_section():
    """The section this process's work and timing go through now (`use_timing_section`)."""
    return _timing_section[-1]


@contextlib.contextmanager
def use_timing_section(path: Optional[Path]) -> Iterator[object]:
    """Within: steps, evaluations and latency timing of this process use the section at `path`
    (None: no section). One section per path and process, reused across runs; its lock files are
    closed when the outermost use ends, so no run leaves a file open in the results store (a disk
    that must be remounted, or a folder removed, after the run)."""
    section = _SECTIONS.setdefault(Path(path), TimingSection(Path(path))) if path is not None else _NoSection()
    _timing_section.append(section)
    try:
        yield section
    finally:
        _timing_section.pop()
        if isinstance(section, TimingSection) and section not in _timing_section:
            section.close()


_SECTIONS: dict = {}

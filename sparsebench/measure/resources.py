"""What a run's training used of the machine, sampled in a background thread at a low rate.

`ResourceSampler` takes a sample every `every` seconds (2 s by default: one read of a few /proc
files, or of psutil, and on CUDA of NVML or torch's counters; nothing on the training thread):

- `cpu_percent`: CPU time of the process and its children (loader workers) per wall second,
  100 = one core busy;
- `rss_mb`: resident memory of the same process tree;
- `shm_mb`: what is in use of /dev/shm (loader workers hand batches over through it);
- on CUDA, `gpu_util_percent` (NVML through pynvml, where it is installed; None otherwise) and
  `gpu_mem_used_mb` (the device's memory in use, every process's, from `torch.cuda.mem_get_info`).

Each sample is handed to a callback that decides whose it is (`training/watch.py` gives it to
the stage that was stepping). `StageResources` sums one stage's samples into the record's
numbers: means and peaks, the device memory the process's tensors peaked at, and the loader
wait fraction (the time steps waited for their batch over the stage's wall time), which says
whether the device was starved.
"""
from __future__ import annotations

import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

SAMPLE_SECONDS = 2.0
_MB = 1024 * 1024


def _psutil():
    try:
        import psutil
    except ImportError:
        return None
    return psutil


def _proc_children(pid: int) -> List[int]:
    """Every descendant of `pid` (loader workers and their own children), from /proc."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for tid in tasks:
            try:
                kids = [int(k) for k in Path(f"/proc/{parent}/task/{tid}/children").read_text().split()]
            except (OSError, ValueError):
                continue
            out += kids
            todo += kids
    return out


def _proc_usage(pid: int) -> Tuple[float, int]:
    """(CPU seconds, resident bytes) of one process from /proc/PID/stat; (0, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0
    ticks = os.sysconf("SC_CLK_TCK")
    # after the name: state is field 3 of stat, utime 14, stime 15, rss (pages) 24
    return (int(fields[11]) + int(fields[12])) / ticks, int(fields[21]) * os.sysconf("SC_PAGE_SIZE")


def process_tree_usage() -> Tuple[float, int]:
    """(CPU seconds so far, resident bytes now) of this process and every live descendant."""
    psutil = _psutil()
    if psutil is not None:
        cpu, rss = 0.0, 0
        me = psutil.Process()
        for proc in [me, *me.children(recursive=True)]:
            try:
                times, memory = proc.cpu_times(), proc.memory_info()
            except psutil.Error:        # a worker that ended between the listing and the read
                continue
            cpu += times.user + times.system
            rss += memory.rss
        return cpu, rss
    cpu, rss = 0.0, 0
    for pid in [os.getpid(), *_proc_children(os.getpid())]:
        c, r = _proc_usage(pid)
        cpu, rss = cpu + c, rss + r
    return cpu, rss


def shm_used_bytes() -> Optional[int]:
    try:
        return shutil.disk_usage("/dev/shm").used
    except OSError:
        return None


class GpuProbe:
    """Utilisation and memory in use of one CUDA device: NVML (pynvml) where installed, else torch's own
    counters (memory only: torch.cuda.utilization needs NVML as well)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.source = "torch"
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            index = device.index if device.index is not None else torch.cuda.current_device()
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self._nvml = pynvml
            self.source = "nvml"
        except Exception:  # noqa: BLE001 -- no pynvml, no driver library, or an index NVML does not know
            self._handle = None

    def sample(self) -> Dict[str, Optional[float]]:
        util = None
        if self._handle is not None:
            try:
                util = float(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)
            except Exception:  # noqa: BLE001 -- a sample is never the reason a run fails
                util = None
        free, total = torch.cuda.mem_get_info(self.device)
        return {"gpu_util_percent": util, "gpu_mem_used_mb": (total - free) / _MB}


def source_name() -> str:
    return "psutil" if _psutil() is not None else "/proc"


class ResourceSampler:
    """A daemon thread that hands `on_sample(sample)` a sample every `every` seconds until `stop()`.
    A sample is {"time", "cpu_percent", "rss_mb", "shm_mb"} plus the GPU's numbers on CUDA."""

    def __init__(self, on_sample: Callable[[dict], None], device: torch.device, every: float = SAMPLE_SECONDS):
        self.on_sample, self.every = on_sample, every
        self.gpu = GpuProbe(device) if torch.device(device).type == "cuda" else None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sparsebench-resources", daemon=True)
        self._last = (time.monotonic(), process_tree_usage()[0])

    def start(self) -> "ResourceSampler":
        self._thread.start()
        return self

    def sample(self) -> dict:
        now = time.monotonic()
        cpu, rss = process_tree_usage()
        then, cpu_then = self._last
        self._last = (now, cpu)
        shm = shm_used_bytes()
        out = {"time": now, "cpu_percent": 100.0 * max(0.0, cpu - cpu_then) / max(now - then, 1e-6),
               "rss_mb": rss / _MB, "shm_mb": None if shm is None else shm / _MB}
        if self.gpu is not None:
            out.update(self.gpu.sample())
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.on_sample(self.sample())
            except Exception:  # noqa: BLE001 -- the sampler never takes a run down; it stops sampling
                return

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)


SAMPLED = ("cpu_percent", "rss_mb", "shm_mb", "gpu_util_percent", "gpu_mem_used_mb")


@dataclass
class StageResources:
    """One training stage's samples (summed as they come: a 290-hour stage takes half a million) and
    step timing, as its record entry (`as_dict`)."""

    samples: int = 0
    steps: int = 0
    wall_seconds: float = 0.0           # the stage's steps, in this process
    data_wait_seconds: float = 0.0      # of that, time the steps waited for their batch
    peak_allocated_mb: Optional[float] = None    # CUDA: the most this process's tensors held
    sums: Dict[str, float] = field(default_factory=dict)      # per sampled number: its sum, count, peak
    counts: Dict[str, int] = field(default_factory=dict)
    peaks: Dict[str, float] = field(default_factory=dict)

    def add(self, sample: dict) -> None:
        self.samples += 1
        for key in SAMPLED:
            value = sample.get(key)
            if value is None:
                continue
            self.sums[key] = self.sums.get(key, 0.0) + value
            self.counts[key] = self.counts.get(key, 0) + 1
            self.peaks[key] = max(self.peaks.get(key, value), value)

    def as_dict(self) -> dict:
        def mean(key):
            return round(self.sums[key] / self.counts[key], 2) if self.counts.get(key) else None

        def peak(key):
            return round(self.peaks[key], 2) if key in self.peaks else None

        return {"samples": self.samples, "steps": self.steps, "wall_seconds": round(self.wall_seconds, 3),
                "loader_wait_fraction": round(self.data_wait_seconds / self.wall_seconds, 4)
                if self.wall_seconds > 0 else None,
                "cpu_percent_mean": mean("cpu_percent"), "cpu_percent_peak": peak("cpu_percent"),
                "rss_mb_mean": mean("rss_mb"), "rss_mb_peak": peak("rss_mb"), "shm_mb_peak": peak("shm_mb"),
                "gpu_util_percent_mean": mean("gpu_util_percent"), "gpu_mem_used_mb_peak": peak("gpu_mem_used_mb"),
                "gpu_peak_allocated_mb": None if self.peak_allocated_mb is None
                else round(self.peak_allocated_mb, 1)}

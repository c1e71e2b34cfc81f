"""Latency of the dense and the realized model, timed the same way in the same process.

Protocol (docs/measurement.md §2): eval + inference mode; one input tensor allocated once
on the device; warm-up; dense and realized timed in alternating blocks so drift hits
both; median and IQR over blocks; speedup = median_dense / median_realized with a
bootstrap interval. CPU uses torch.utils.benchmark at a fixed thread count; CUDA uses
CUDA events with synchronisation.

`rounds` is the most blocks per model. Timing stops after `min_rounds` (an even number, so
each model has led equally often) once the 95 % interval of the speedup is narrower than
`stop_width` of it; each entry records the blocks it took. A CPU block is torch.utils.benchmark's
`blocked_autorange` the first time (its warm-up finds the calls per timed run for that model
and batch); later blocks reuse that number after a short warm-up of their own, the same
measurement without re-searching it every block.

`max_seconds` bounds one batch size's measurement, warm-up included, for a caller on a time
budget (the GPU tables): warm-up stops early (at least 2 calls per model), block lengths shrink
(CUDA: calls per block; CPU: `min_run_time`) so that `min_rounds` blocks fit, and once each model
has led once (2 blocks each, the least ever timed) no pair of rounds starts that would end past it.
Entries record the calls per block and `stopped_by: "time cap"` where the bound ended timing.

The whole measurement runs in the process's timing section (`platform.timing_section`):
inside a sweep, every other worker pauses at its next training step or evaluation batch
until it is done, and each entry records `exclusive: true`.
"""
from __future__ import annotations

import contextlib
import copy
import statistics
import time
import timeit
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from sparsebench.measure.runtimes import for_runtime
from sparsebench.platform import timing_section


@dataclass(frozen=True)
class LatencySettings:
    batch_sizes: Sequence[int] = (1, 64)
    threads: int = 1
    min_run_time: float = 0.1      # seconds per CPU block (blocked_autorange)
    rounds: int = 6                # alternating blocks per model, at most (even: each leads equally often)
    min_rounds: int = 4            # blocks per model before timing may stop early
    stop_width: float = 0.02       # stop once the speedup's 95 % interval is narrower than this × speedup
    warmup: int = 3                # CPU warm-up calls (GPU: cuda_warmup)
    cuda_warmup: int = 50
    cuda_iters: int = 200
    dtype: str = "float32"
    channels_last: bool = False
    compile: bool = False          # older spelling of runtime="compile"
    runtime: str = "eager"         # eager | compile | onnxruntime (measure/runtimes.py): dense and realized both
    max_seconds: Optional[float] = None   # per batch size, warm-up included (see _time_pair); None: no bound


@dataclass
class Timing:
    times: List[float] = field(default_factory=list)   # seconds per call, one per block

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def iqr(self) -> float:
        q1, q3 = np.percentile(self.times, [25, 75])
        return float(q3 - q1)


def _needs_cast(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> bool:
    """Whether timing `model` at (device, dtype, memory format) would change any of its tensors."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != device.type or (device.index is not None and t.device.index != device.index):
            return True
        if t.is_floating_point() and t.dtype != dtype:
            return True
        if channels_last and t.dim() == 4 and not t.is_contiguous(memory_format=torch.channels_last):
            return True
    return False


def runtime_of(settings: LatencySettings) -> str:
    return "compile" if settings.compile else settings.runtime


def _prepare(model: nn.Module, device: torch.device, settings: LatencySettings,
             example: Optional[torch.Tensor] = None) -> nn.Module:
    """The model to time: `model` itself when it already is on `device` in the timing dtype and memory
    format, else a cast copy. `Module.to` casts in place, and the caller's model (the run's dense
    model, the FLOPs-target loop's source of compactions) goes on to be compacted, traced and saved
    in its own dtype. Train/eval mode is the caller's to restore (`_eval_modes`)."""
    dtype = getattr(torch, settings.dtype)
    if any(p.is_sparse or type(p.data) is not torch.Tensor for p in model.parameters()):
        pass                        # semi-structured weights: already on device, in their dtype (realize made them)
    elif _needs_cast(model, device, dtype, settings.channels_last):
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
        if settings.channels_last:
            model = model.to(memory_format=torch.channels_last)
    model.eval()
    runtime = runtime_of(settings)
    if runtime != "eager":
        if example is None:
            raise ValueError(f"the {runtime} runtime needs an example input to build and check the model")
        model = for_runtime(model, runtime, example, settings.threads)
    return model


@contextlib.contextmanager
def _eval_modes(*models: nn.Module):
    """Restore every submodule's train/eval flag on exit: timing runs in eval mode, the caller's
    models come back in the modes they had."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def quiet_cpp_extension_logger() -> None:
    """torch.utils.cpp_extension (imported by torch.utils.benchmark and torch-pruning) logs a
    CUDA_HOME warning on every start on CPU-only machines; it says nothing about our runs."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def _benchmark_module():
    """torch.utils.benchmark, imported on first use (slow to import)."""
    quiet_cpp_extension_logger()
    from torch.utils import benchmark

    return benchmark


def _time_block_cpu(model, x, settings: LatencySettings, number: Optional[int] = None,
                    min_run_time: Optional[float] = None) -> tuple:
    """(median seconds per call, calls per timed run). Without `number`: `blocked_autorange`, which
    finds it. With it: a warm-up of a tenth of a run, then timed runs of `number` calls until
    `min_run_time` (default: the settings') is spent, as `blocked_autorange` times after its search."""
    min_run_time = settings.min_run_time if min_run_time is None else min_run_time
    if number is None:
        timer = _benchmark_module().Timer(stmt="model(x)", globals={"model": model, "x": x},
                                          num_threads=settings.threads)
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        return measurement.median, measurement.number_per_run
    # the stdlib timer torch.utils.benchmark runs on CPU (GC off, perf_counter); threads are set by the caller
    timer = timeit.Timer("model(x)", globals={"model": model, "x": x})
    timer.timeit(max(1, number // 10))
    times, total = [], 0.0
    while total < min_run_time:
        t = max(timer.timeit(number), 1e-9)
        times.append(t / number)
        total += t
    return statistics.median(times), number


def _time_block_cuda(model, x, iters: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        model(x)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000.0 / iters


def _warm_up(model, x, calls: int, cuda: bool, max_seconds: Optional[float]) -> float:
    """Run `calls` warm-up calls (at least 2 under a time bound, which may stop them early); the
    seconds the last one took, synchronised on CUDA (the first calls pay for autotuning and caches)."""
    start, last = time.perf_counter(), 0.0
    for i in range(calls):
        t0 = time.perf_counter()
        model(x)
        if cuda:
            torch.cuda.synchronize()
        last = time.perf_counter() - t0
        if max_seconds is not None and i >= 1 and time.perf_counter() - start >= max_seconds:
            break
    return last


def bootstrap_ratio_ci(a: Sequence[float], b: Sequence[float], n: int = 1000, seed: int = 0) -> tuple:
    """95 % bootstrap interval of median(a) / median(b)."""
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a), np.asarray(b)
    ratios = [np.median(rng.choice(a, len(a))) / np.median(rng.choice(b, len(b))) for _ in range(n)]
    return float(np.percentile(ratios, 2.5)), float(np.percentile(ratios, 97.5))


def compare_latency(
    dense: nn.Module,
    realized: nn.Module,
    input_size: Sequence[int],
    settings: LatencySettings,
    device: Optional[torch.device] = None,
) -> Dict[str, dict]:
    """Time dense vs realized at each batch size; returns per-batch medians, IQRs and speedup.

    Neither model is changed: one that needs another device, dtype or memory format is timed as a
    cast copy, and every module's train/eval mode is restored. The thread count and
    `cudnn.benchmark` (set for CUDA timing) are process-wide and restored on the way out too.
    Both models run under `settings.runtime`; one it cannot run raises `RuntimeUnsupported`
    ("not supported by RUNTIME: why") before anything is timed."""
    device = device or torch.device("cpu")
    cuda = device.type == "cuda"
    old_benchmark = torch.backends.cudnn.benchmark     # process-wide: training after this must see it unchanged
    old_threads = torch.get_num_threads()
    results: Dict[str, dict] = {}
    try:
        if cuda:
            torch.backends.cudnn.benchmark = True
        torch.set_num_threads(settings.threads)
        with _eval_modes(dense, realized):
            example = _input(min(settings.batch_sizes), input_size, device, settings)
            models = {"dense": _prepare(dense, device, settings, example),
                      "realized": _prepare(realized, device, settings, example)}
            with timing_section().exclusive() as exclusive:
                for bs in settings.batch_sizes:
                    x = _input(bs, input_size, device, settings)
                    results[str(bs)] = {"batch_size": bs, "runtime": runtime_of(settings),
                                        **_time_pair(models, x, settings, cuda), "exclusive": bool(exclusive)}
    finally:
        torch.set_num_threads(old_threads)
        torch.backends.cudnn.benchmark = old_benchmark
    return results


def _input(batch: int, input_size: Sequence[int], device: torch.device, settings: LatencySettings) -> torch.Tensor:
    """The one input tensor both models are timed on, allocated on the device in the timing dtype."""
    x = torch.randn(batch, *input_size, device=device, dtype=getattr(torch, settings.dtype))
    if settings.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _time_pair(models: Dict[str, nn.Module], x: torch.Tensor, settings: LatencySettings, cuda: bool) -> dict:
    """Dense and realized at one input, in alternating blocks, until `rounds`, a tight interval or
    `max_seconds`."""
    timings = {k: Timing() for k in models}
    numbers: Dict[str, Optional[int]] = dict.fromkeys(models)
    least = min(settings.rounds, max(2, settings.min_rounds + settings.min_rounds % 2))
    budget = settings.max_seconds
    start = time.perf_counter()
    stopped_by = None
    with torch.inference_mode():
        # a time bound leaves warm-up a sixth of it, shared by the two models
        warm_bound = None if budget is None else budget / 12
        per_call = {k: _warm_up(m, x, settings.cuda_warmup if cuda else settings.warmup, cuda, warm_bound)
                    for k, m in models.items()}
        iters = dict.fromkeys(models, settings.cuda_iters)
        min_run_time = settings.min_run_time
        if budget is not None:           # blocks sized so that `least` rounds fit what is left
            block = max(0.0, budget - (time.perf_counter() - start)) / (2 * least)
            iters = {k: max(1, min(settings.cuda_iters, int(block / max(per_call[k], 1e-6)))) for k in models}
            min_run_time = min(settings.min_run_time, max(block, 1e-6))   # > 0: at least one timed run
        for r in range(settings.rounds):
            round_start = time.perf_counter()
            order = ("dense", "realized") if r % 2 == 0 else ("realized", "dense")
            for key in order:
                if cuda:
                    timings[key].times.append(_time_block_cuda(models[key], x, iters[key]))
                else:
                    t, numbers[key] = _time_block_cpu(models[key], x, settings, numbers[key], min_run_time)
                    timings[key].times.append(t)
            done = r + 1
            if done >= least and done % 2 == 0 and done < settings.rounds:
                d, z = timings["dense"], timings["realized"]
                lo, hi = bootstrap_ratio_ci(d.times, z.times)
                if hi - lo <= settings.stop_width * d.median / z.median:
                    stopped_by = "interval"
                    break
            now = time.perf_counter()
            if (budget is not None and done >= 2 and done % 2 == 0 and done < settings.rounds
                    and now - start + 2 * (now - round_start) > budget):     # the next two rounds would not fit
                stopped_by = "time cap"
                break
    d, z = timings["dense"], timings["realized"]
    lo, hi = bootstrap_ratio_ci(d.times, z.times)
    return {
        "dense_ms": d.median * 1e3, "dense_iqr_ms": d.iqr * 1e3,
        "realized_ms": z.median * 1e3, "realized_iqr_ms": z.iqr * 1e3,
        "measured_speedup": d.median / z.median, "speedup_ci95": [lo, hi],
        "blocks": len(d.times), "max_blocks": settings.rounds, "stopped_early": stopped_by is not None,
        "stopped_by": stopped_by, "calls_per_block": iters if cuda else numbers,
        "seconds": time.perf_counter() - start,
    }

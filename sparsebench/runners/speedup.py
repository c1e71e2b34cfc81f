"""The speedup table: theoretical vs measured speedup of structured and unstructured pruning.

For each model and FLOPs target, the L1 structured baseline picks units (CNN channels
through the dependency graph, ViT heads and MLP neurons), the model is physically
compacted, the compacted model is checked against the masked one (a fast wrong model is
a bug, not a speedup), and dense and compacted are timed in the same process on the same
input (measure/latency.py). Latency does not depend on trained weights, so models are
randomly initialised; accuracy is the leaderboard's business.

For each sparsity target, magnitude masks (per layer or global, input layer and classifier
dense, as the magnitude baselines prune) are applied to the same random weights, and each
realization of unstructured masks (`auto`, `csr`: measure/unstructured.py) is timed against
dense at each batch and thread count; `auto` calibrates its per-layer choice at that batch and
thread count, as a run's measurement does at its throughput batch.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Callable, List, Optional, Sequence

import torch

from sparsebench.measure.environment import code_version, environment
from sparsebench.measure.flops import count_macs
from sparsebench.measure.latency import LatencySettings, compare_latency
from sparsebench.measure.runtimes import RuntimeUnsupported, check_runtime
from sparsebench.models import create_model


@dataclass(frozen=True)
class SpeedupConfig:
    models: Sequence[str] = ("resnet18", "resnet50", "mobilenet_v2", "deit_tiny", "deit_small")
    flops: Sequence[float] = (0.75, 0.5, 0.25)
    img_size: int = 224
    batch_sizes: Sequence[int] = (1, 32)
    threads: Sequence[int] = (1, 2)
    device: str = "cpu"
    dtype: str = "float32"
    compile: bool = False                        # older spelling of runtimes=("compile",)
    runtimes: Sequence[str] = ("eager",)         # eager | compile | onnxruntime: dense and realized both
    channels_last: bool = False
    min_run_time: float = 0.2
    rounds: int = 5
    method: str = "l1-channel"
    sparsities: Sequence[float] = ()             # unstructured targets: magnitude masks at these sparsities
    kernels: Sequence[str] = ("auto", "csr")     # realizations of the unstructured masks
    mask_scope: str = "layerwise"                # layerwise | global magnitude ranking
    calibration_seconds: float = 30.0            # auto's calibration bound per realization


def speedup_rows(config: SpeedupConfig, progress=None, time_left: Optional[Callable[[], float]] = None) -> List[dict]:
    """One row per (model, FLOPs target, threads, batch). With `time_left` (seconds left to the
    caller's budget), each timing shares what is left with the ones after it (`max_seconds`), and a
    target after the first reached with no time left gets one row with `status: "skipped: time cap"`
    (the first is always timed: a model started is a model measured)."""
    from sparsebench.methods import create_method
    from sparsebench.methods.baselines import unit_space

    device = torch.device(config.device)
    input_size = (3, config.img_size, config.img_size)
    method = create_method(config.method)
    rows = []
    for name in config.models if config.flops else ():
        torch.manual_seed(0)
        dense = create_model(name, num_classes=1000, img_size=config.img_size).to(device).eval()
        dense_macs = count_macs(dense, input_size).macs
        space = unit_space(dense, input_size, method.config.residual_mode)
        probe = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
        scores = method.unit_scores(dense, space, torch.Generator().manual_seed(0))
        for i, target in enumerate(config.flops):
            if time_left is not None and i > 0 and time_left() <= 0:
                rows += [{"model": name, "method": config.method, "target_flops": t, "dtype": config.dtype,
                          "status": "skipped: time cap"} for t in config.flops[i:]]
                break
            kept = method.select_units(space, scores, target)
            compact = space.compact(dense, kept).eval()
            error = space.check_compaction(dense, kept, compact, probe)
            macs = count_macs(compact, input_size).macs
            settings_list = [(threads, runtime) for threads in config.threads for runtime in _runtimes(config)]
            for j, (threads, runtime) in enumerate(settings_list):
                timings_left = (len(config.flops) - i) * len(settings_list) - j
                settings = LatencySettings(batch_sizes=tuple(config.batch_sizes), threads=threads,
                                           min_run_time=config.min_run_time, rounds=config.rounds,
                                           dtype=config.dtype, runtime=runtime,
                                           channels_last=config.channels_last,
                                           max_seconds=None if time_left is None else
                                           max(0.0, time_left()) / timings_left / len(config.batch_sizes))
                base = {"model": name, "method": config.method, "target_flops": target,
                        "achieved_flops_ratio": macs / dense_macs, "dense_gmacs": dense_macs / 1e9,
                        "realized_gmacs": macs / 1e9, "theoretical_speedup": dense_macs / macs,
                        "realization": "compacted", "runtime": runtime, "threads": threads, "dtype": config.dtype,
                        "compile": runtime == "compile"}
                try:
                    timing = compare_latency(dense, compact, input_size, settings, device)
                except RuntimeUnsupported as e:
                    rows += [{**base, "batch": b, "status": str(e)} for b in config.batch_sizes]
                    continue
                for batch, t in timing.items():
                    rows.append({
                        **base, "batch": int(batch), "dense_ms": t["dense_ms"], "dense_iqr_ms": t["dense_iqr_ms"],
                        "realized_ms": t["realized_ms"], "realized_iqr_ms": t["realized_iqr_ms"],
                        "measured_speedup": t["measured_speedup"], "speedup_ci95_low": t["speedup_ci95"][0],
                        "speedup_ci95_high": t["speedup_ci95"][1],
                        "measured_over_theoretical": t["measured_speedup"] / (dense_macs / macs),
                        "max_abs_error": error, "blocks": t["blocks"], "stopped_by": t["stopped_by"],
                        "status": "measured",
                    })
                if progress:
                    progress(rows[-1])
    if config.sparsities:
        rows += unstructured_rows(config, progress, time_left)
    return rows


def _runtimes(config: SpeedupConfig) -> tuple:
    """The runtimes to time under, in order, each once (`compile=True` adds "compile")."""
    names = tuple(config.runtimes) + (("compile",) if config.compile else ())
    return tuple(dict.fromkeys(check_runtime(r) for r in names))


def magnitude_masked(dense: torch.nn.Module, sparsity: float, scope: str = "layerwise") -> torch.nn.Module:
    """A copy of `dense` with magnitude masks at `sparsity` over its conv/linear weights, input layer and
    classifier left dense (the magnitude baselines' defaults): per layer at a uniform density
    ("layerwise") or one global ranking ("global")."""
    from sparsebench.training.masks import (global_topk_masks, keep_counts, layer_densities, layerwise_topk_masks,
                                            prunable_weights)

    if scope not in ("layerwise", "global"):
        raise ValueError(f"unknown mask scope {scope!r}; allowed: layerwise, global")
    model = copy.deepcopy(dense)
    params = prunable_weights(model, skip_first=True, skip_last=True)
    scores = {n: p.detach().abs() for n, p in params.items()}
    masks = global_topk_masks(scores, sparsity) if scope == "global" else \
        layerwise_topk_masks(scores, keep_counts(params, layer_densities(params, sparsity)))
    with torch.no_grad():
        for n, p in params.items():
            p.mul_(masks[n].to(p.dtype))
    return model


def unstructured_rows(config: SpeedupConfig, progress=None,
                      time_left: Optional[Callable[[], float]] = None) -> List[dict]:
    """One row per (model, sparsity, realization, threads, batch): theoretical speedup (dense MACs /
    non-zero MACs) against the realization's measured one. `auto` calibrates at each (threads, batch)."""
    from sparsebench.measure.realize import realize
    from sparsebench.measure.unstructured import Calibration

    device = torch.device(config.device)
    input_size = (3, config.img_size, config.img_size)
    rows = []
    total = len(config.models) * len(config.sparsities) * len(config.kernels) * len(config.threads) * \
        len(config.batch_sizes)
    countdown = iter(range(total, 0, -1))          # (realization, threads, batch) timings left, this one included
    for name in config.models:
        torch.manual_seed(0)
        dense = create_model(name, num_classes=1000, img_size=config.img_size).to(device).eval()
        dense_macs = count_macs(dense, input_size).macs
        for sparsity in config.sparsities:
            masked = magnitude_masked(dense, sparsity, config.mask_scope)
            effective = count_macs(masked, input_size).macs_effective
            base = {"model": name, "method": f"magnitude-{config.mask_scope}", "target_sparsity": sparsity,
                    "achieved_flops_ratio": effective / dense_macs, "dense_gmacs": dense_macs / 1e9,
                    "realized_gmacs": effective / 1e9, "theoretical_speedup": dense_macs / effective,
                    "dtype": config.dtype}
            for kernel in config.kernels:
                for threads in config.threads:
                    for batch in config.batch_sizes:
                        row = {**base, "realization": kernel, "threads": threads, "batch": batch}
                        timings_left = next(countdown)
                        if time_left is not None and time_left() <= 0:
                            rows += [{**row, "runtime": r, "status": "skipped: time cap"} for r in _runtimes(config)]
                            continue
                        # under a caller's budget, each of the timings left gets an equal share
                        left = None if time_left is None else max(0.0, time_left()) / timings_left
                        calibration = Calibration(input_size=input_size, batch=batch, threads=threads,
                                                  max_seconds=config.calibration_seconds if left is None else
                                                  min(config.calibration_seconds, left / 4))
                        realized = realize(masked, "masked", device, config.dtype, calibration=calibration,
                                           kernel=kernel)
                        if not realized.realizable:
                            rows += [{**row, "runtime": r, "status": realized.reason} for r in _runtimes(config)]
                            continue
                        details = realized.details
                        row.update({"sparse_layers": details["sparse_layers"], "layers": details["layers_total"],
                                    "calibration_s": details["calibration"]["seconds"]})
                        for runtime in _runtimes(config):      # auto's choice is calibrated eagerly, then kept
                            settings = LatencySettings(batch_sizes=(batch,), threads=threads,
                                                       min_run_time=config.min_run_time, rounds=config.rounds,
                                                       dtype=config.dtype, runtime=runtime,
                                                       channels_last=config.channels_last,
                                                       max_seconds=None if left is None else
                                                       left * 3 / 4 / len(_runtimes(config)))
                            try:
                                t = compare_latency(dense, realized.model, input_size, settings, device)[str(batch)]
                            except RuntimeUnsupported as e:
                                rows.append({**row, "runtime": runtime, "status": str(e)})
                                continue
                            rows.append({
                                **row, "runtime": runtime, "compile": runtime == "compile",
                                "dense_ms": t["dense_ms"], "dense_iqr_ms": t["dense_iqr_ms"],
                                "realized_ms": t["realized_ms"], "realized_iqr_ms": t["realized_iqr_ms"],
                                "measured_speedup": t["measured_speedup"], "speedup_ci95_low": t["speedup_ci95"][0],
                                "speedup_ci95_high": t["speedup_ci95"][1],
                                "measured_over_theoretical": t["measured_speedup"] / base["theoretical_speedup"],
                                "blocks": t["blocks"], "stopped_by": t["stopped_by"], "status": "measured",
                            })
                            if progress:
                                progress(rows[-1])
    return rows


def speedup_environment(config: SpeedupConfig) -> dict:
    return {**environment(torch.device(config.device), max(config.threads)), "code_version": code_version(), "config": {
        k: list(v) if isinstance(v, tuple) else v for k, v in config.__dict__.items()}}


__all__ = ["SpeedupConfig", "speedup_rows", "unstructured_rows", "magnitude_masked", "speedup_environment",
           "replace"]

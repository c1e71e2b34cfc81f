"""The GPU tables: measured speedup on one CUDA GPU, written under results/speedup/cuda-<gpu>/.

Parts, each timed dense vs realized in the same process on the same input
(`sparsebench.measure.latency.compare_latency`: CUDA events, synchronisation, warm-up,
alternating blocks, median and bootstrap interval):

1. structured  L1 channel/head pruning at FLOPs 0.75/0.5/0.25 of ResNet-18/50, MobileNetV2,
               DeiT-Tiny/Small/Base, compacted, at batch 1 and 128, fp32 and bf16, eager.
2. sparse24    2:4 semi-structured kernels on the Linear layers of DeiT-Small/Base in
               fp16/bf16: the first block's MLP layers alone and the whole model, batch 1 and 128.
3. methods     the exported model of every structured seed-method record found (PASS,
               S²ViTE, OFB, SViTE+ drop), timed at its own size and scaled by keep ratio to
               the full-size model of its family.
4. quick       the quick suite on the GPU, one seed, every method: the runs that finish in the cap.
5. loop        our training step against timm's own loader and train.py loop on ResNet-50 and
               DeiT-Small at 224 (bf16, channels_last for the CNN, loader workers; the same
               comparison as benchmarks/perf/test_loop_vs_timm.py): ours/timm throughput.
6. unstructured  magnitude masks at sparsity 0.9 and 0.95 on DeiT-Small and ResNet-50 (fp32), realized
               by `csr` (every layer on cuSPARSE CSR × dense) and `auto` (per layer the faster of
               dense and CSR, calibrated at each batch), against dense at batch 1 and 128.
7. compile     (opt-in: `--parts ... compile`) bf16 at FLOPs 0.5 under torch.compile for ResNet-50
               and DeiT-Small; compilation alone takes about a minute per model pair, so it is not
               part of the 8-minute default.

Time caps hold inside cells, not only between them: a part's cap is shared out among its cells
(by weight), each cell shares its allowance among its timings (`LatencySettings.max_seconds`:
shorter warm-up and blocks, fewer rounds, never fewer than 2 blocks per model), stops before a
timing once its allowance is spent (after its first: a cell started measures something), and
lists what it left out as "skipped: time cap"; the quick suite's process is stopped at its
allowance, its workers with it. No cell starts once its part's cap is spent, so a part ends
within its cap plus `GRACE_S` (the least one cell's first timing can take). Each cell's rows
are on disk as soon as the cell finishes: appended to PART.jsonl, PART.csv and PART.md
rewritten, and parts.md (seconds per part against its cap) updated, so a run stopped from
outside keeps every finished cell.

`--dry-run` runs the same plan on the CPU at stand-in size (tiny models of each family at
16 px, batches 1 and 4, a sweep's own dry run for the quick part) under its own caps, after
checking that every model, method and kernel API the GPU plan needs imports: any machine can
check that the script completes within its caps and writes a table per cell.
"""
from __future__ import annotations

import argparse
import json
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

STRUCTURED_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "deit_tiny", "deit_small", "deit_base")
FLOPS = (0.75, 0.5, 0.25)
SPARSE24_MODELS = ("deit_small", "deit_base")
COMPILE_MODELS = ("resnet50", "deit_small")
SEED_STRUCTURED = ("pass", "s2vite", "ofb", "svite-plus")
LOOP_MODELS = ("resnet50", "deit_small")
UNSTRUCTURED_MODELS = ("deit_small", "resnet50")
SPARSITIES = (0.9, 0.95)
DEFAULT_PARTS = ("structured", "sparse24", "unstructured", "methods", "quick", "loop")
# Seconds per part on one H100 (estimates: no GPU was at hand when they were set). With about 15 s
# of start-up and GRACE_S per part, the tables take at most ~320 s (run.sh's limit for this step);
# re-timing the two committed results directories and their leaderboards get the rest of run.sh's 8 minutes.
GPU_CAPS_S = {"structured": 95, "sparse24": 35, "unstructured": 35, "methods": 30, "quick": 40, "loop": 30,
              "compile": 240}
DRY_CAPS_S = {"structured": 40, "sparse24": 5, "unstructured": 15, "methods": 25, "quick": 40, "loop": 60,
              "compile": 30}
GRACE_S = {"cuda": 10.0, "cpu": 5.0}


@dataclass(frozen=True)
class Plan:
    """What the parts time and where: the GPU plan, or its CPU stand-in (`--dry-run`)."""

    device: str
    img_size: int
    batches: Tuple[int, ...]
    full_size: Dict[str, str]                  # family -> the full-size model a method's structure is scaled onto
    stand_in: Optional[Dict[str, str]] = None  # family -> the tiny model timed in place of each model (dry run)
    rounds: int = 6
    min_run_time: float = 0.05                 # CPU blocks (the dry run)
    caps: Dict[str, float] = field(default_factory=lambda: dict(GPU_CAPS_S))
    quick_args: Tuple[str, ...] = ("--device", "cuda")
    # the loop comparison: (batch, loader workers, blocks, steps per block); full-size models in both plans
    loop: Tuple[int, int, int, int] = (64, 4, 5, 3)

    @property
    def dry(self) -> bool:
        return self.stand_in is not None

    @property
    def grace(self) -> float:
        return GRACE_S["cuda" if self.device.startswith("cuda") else "cpu"]

    def model(self, name: str) -> str:
        """The model timed for `name`: itself, or its family's stand-in in the dry run."""
        if self.stand_in is None:
            return name
        from sparsebench.models import model_family

        return self.stand_in[model_family(name)]


GPU_PLAN = Plan(device="cuda", img_size=224, batches=(1, 128), full_size={"cnn": "resnet50", "vit": "deit_small"})
DRY_PLAN = Plan(device="cpu", img_size=16, batches=(1, 4), full_size={"cnn": "resnet20_tiny", "vit": "vit_cifar_tiny"},
                stand_in={"cnn": "resnet20_tiny", "vit": "vit_cifar_tiny"}, rounds=2, min_run_time=0.01,
                caps=dict(DRY_CAPS_S), quick_args=("--dry-run",), loop=(2, 0, 2, 1))


class Budget:
    """The time a cell may still spend: `left()` seconds until its deadline."""

    def __init__(self, seconds: float):
        self.deadline = time.perf_counter() + seconds

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def share(self, timings_left: int) -> float:
        """`max_seconds` for the next of `timings_left` timings: an equal share of what is left."""
        return max(0.0, self.left()) / max(1, timings_left)


@dataclass(frozen=True)
class Cell:
    part: str
    label: str
    run: Callable[[Budget], List[dict]]
    weight: float = 1.0          # share of its part's cap, relative to the part's other cells
    min_seconds: float = 0.0     # not started with less of its part's cap left


def gpu_slug() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


# --- structured ---------------------------------------------------------------------------------
def structured_cells(plan: Plan) -> List[Cell]:
    return [_structured_cell(plan, "structured", model, dtype, FLOPS, compile=False)
            for dtype in ("float32", "bfloat16") for model in STRUCTURED_MODELS]


def compile_cells(plan: Plan) -> List[Cell]:
    return [_structured_cell(plan, "compile", model, "bfloat16", (0.5,), compile=True, min_seconds=60.0)
            for model in COMPILE_MODELS]


def _structured_cell(plan: Plan, part: str, model: str, dtype: str, flops, compile: bool,
                     min_seconds: float = 0.0) -> Cell:
    from sparsebench.runners.speedup import SpeedupConfig, speedup_rows

    timed = plan.model(model)
    config = SpeedupConfig(models=(timed,), flops=flops, img_size=plan.img_size, batch_sizes=plan.batches,
                           threads=(1,), device=plan.device, rounds=plan.rounds, min_run_time=plan.min_run_time,
                           dtype=dtype, compile=compile)
    label = f"{model}{'' if timed == model else f' (as {timed})'} {dtype} {'compile' if compile else 'eager'}"
    return Cell(part, label, lambda budget: speedup_rows(config, time_left=budget.left), min_seconds=min_seconds)


# --- unstructured -------------------------------------------------------------------------------
def unstructured_cells(plan: Plan) -> List[Cell]:
    """Magnitude masks realized by csr and auto against dense, one cell per model."""
    from sparsebench.runners.speedup import SpeedupConfig, unstructured_rows

    cells = []
    for model in UNSTRUCTURED_MODELS:
        timed = plan.model(model)
        config = SpeedupConfig(models=(timed,), flops=(), sparsities=SPARSITIES, kernels=("csr", "auto"),
                               img_size=plan.img_size, batch_sizes=plan.batches, threads=(1,), device=plan.device,
                               rounds=plan.rounds, min_run_time=plan.min_run_time, calibration_seconds=5.0)
        label = f"{model}{'' if timed == model else f' (as {timed})'} float32 csr/auto"
        cells.append(Cell("unstructured", label, lambda budget, c=config: unstructured_rows(c, time_left=budget.left)))
    return cells


# --- sparse24 -----------------------------------------------------------------------------------
def sparse24_rows(plan: Plan, model_name: str, dtype_name: str, budget: Budget) -> List[dict]:
    """Per-MLP-layer and whole-model 2:4 speedup; every Linear left dense is listed with its reason."""
    import copy

    from torch import nn

    from sparsebench.measure.latency import LatencySettings, compare_latency
    from sparsebench.measure.sparse24 import prune_2to4_, semi_structured_support, to_semi_structured
    from sparsebench.models import create_model

    dtype = getattr(torch, dtype_name)
    ok, why = semi_structured_support(plan.device, dtype)
    if not ok:
        return [{"model": model_name, "dtype": dtype_name, "scope": "all", "status": f"not realizable: {why}"}]
    device = torch.device(plan.device)
    torch.manual_seed(0)
    dense = create_model(plan.model(model_name), num_classes=1000, img_size=plan.img_size).to(device, dtype).eval()
    pruned = copy.deepcopy(dense)
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("blocks."):
            prune_2to4_(m)
    sparse, converted, skipped = to_semi_structured(pruned, dtype)
    settings = LatencySettings(batch_sizes=(1,), dtype=dtype_name, rounds=plan.rounds, min_run_time=plan.min_run_time)
    tokens = dense.patch_embed.num_patches + dense.num_prefix_tokens
    # (scope, dense module, 2:4 module, input shape per sample): a Linear sees (batch·tokens, in) inside the model
    jobs = [(f"blocks.0.mlp.{layer}", _Flat(getattr(pruned.blocks[0].mlp, layer)),
             _Flat(getattr(sparse.blocks[0].mlp, layer)), (tokens, getattr(pruned.blocks[0].mlp, layer).in_features))
            for layer in ("fc1", "fc2")] + [("whole model", dense, sparse, (3, plan.img_size, plan.img_size))]
    rows = []
    timings = [(job, bs) for job in jobs for bs in plan.batches]
    for i, ((scope, dense_m, sparse_m, shape), bs) in enumerate(timings):
        row = {"model": model_name, "dtype": dtype_name, "scope": scope, "batch": bs}
        if i > 0 and budget.left() <= 0:            # a cell started times at least one thing
            rows.append({**row, "status": "skipped: time cap"})
            continue
        t = compare_latency(dense_m, sparse_m, shape, replace(settings, batch_sizes=(bs,),
                                                              max_seconds=budget.share(len(timings) - i)),
                            device)[str(bs)]
        extra = ({"shape": list(dense_m.linear.weight.shape)} if scope != "whole model" else
                 {"converted_linears": converted, "dense_linears": len(skipped)})
        rows.append({**row, **extra, **_speed(t)})
    return rows


class _Flat(torch.nn.Module):
    def __init__(self, linear):
        super().__init__()
        self.linear = linear

    def forward(self, x):
        return self.linear(x.flatten(0, -2))


def _speed(t: dict) -> dict:
    return {"dense_ms": t["dense_ms"], "realized_ms": t["realized_ms"], "measured_speedup": t["measured_speedup"],
            "speedup_ci95_low": t["speedup_ci95"][0], "speedup_ci95_high": t["speedup_ci95"][1],
            "blocks": t["blocks"], "stopped_by": t["stopped_by"], "status": "measured"}


def sparse24_cells(plan: Plan) -> List[Cell]:
    return [Cell("sparse24", f"{m} {d}", lambda budget, m=m, d=d: sparse24_rows(plan, m, d, budget))
            for m in SPARSE24_MODELS for d in ("float16", "bfloat16")]


# --- methods ------------------------------------------------------------------------------------
def scaled_keep(ratios: List[float], n: int) -> List[float]:
    """Keep ratios of `len(ratios)` ordered groups mapped onto `n` groups by relative position."""
    if not ratios:
        return [1.0] * n
    return [ratios[min(len(ratios) - 1, round(i * (len(ratios) - 1) / max(1, n - 1)))] for i in range(n)]


def method_rows(plan: Plan, record, budget: Budget) -> List[dict]:
    """Time a record's structure: at the size it was found, and scaled by keep ratio onto the
    full-size model of its family (which units are kept does not change latency)."""
    from sparsebench.methods.baselines import unit_space
    from sparsebench.models import model_family

    structure = record.structure or {}
    family = model_family(record.model)
    if record.method == "svite-plus":
        return token_drop_rows(plan, record, budget)
    if family == "vit" and "blocks" in structure:
        blocks = structure["summary"] if "summary" in structure else None
        if blocks is None:
            return [_skip(record, "structure has no per-block summary")]
        heads0 = max(blocks["heads"]) or 1
        ratios = []
        for h, m in zip(blocks["heads"], blocks["mlp"]):
            ratios += [h / heads0, m / max(blocks["mlp"] + [1])]
    elif family == "cnn" and "groups" in structure:
        ratios = [g["kept"] / g["size"] for g in structure["groups"]]
    else:
        return [_skip(record, "no unit structure in the record (not a compacted channel/head result)")]

    def compacted(dense, img):
        space = unit_space(dense, (3, img, img), "coupled")
        kept = []
        for r, g in zip(scaled_keep(ratios, len(space.groups)), space.groups):
            m = torch.zeros(g.size, dtype=torch.bool)
            m[:max(1, round(r * g.size))] = True
            kept.append(m)
        return space.compact(dense, kept).eval(), record.target_label

    return _timed_at_both_sizes(plan, record, family, compacted, budget)


def token_drop_rows(plan: Plan, record, budget: Budget) -> List[dict]:
    """SViTE+ in drop mode: the same keep ratio of tokens, at its own size and on the full-size ViT."""
    import copy

    from sparsebench.methods import create_method
    from sparsebench.methods.svite import TokenSelector, insert_selector
    from sparsebench.training.vit_slim import num_tokens

    args = record.method_args
    if args.get("token_mode") != "drop":
        return [_skip(record, "SViTE+ in mask mode zeroes tokens: nothing shorter to time beyond its base")]
    method = create_method("svite-plus", **args)

    def dropped(dense, img):
        n, keep = num_tokens(dense, (3, img, img)), method.keep_count(dense, (3, img, img))
        model = copy.deepcopy(dense)
        insert_selector(model, TokenSelector(dense.embed_dim, keep, dense.num_prefix_tokens,
                                             mode="drop").to(plan.device))
        return model.eval(), f"{record.target_label}, tokens {keep}/{n}"

    return _timed_at_both_sizes(plan, record, "vit", dropped, budget)


def _timed_at_both_sizes(plan: Plan, record, family: str, realize, budget: Budget) -> List[dict]:
    """Dense vs `realize(dense, img)` at the record's own size and on the family's full-size model."""
    from sparsebench.measure.flops import count_macs
    from sparsebench.measure.latency import LatencySettings, compare_latency
    from sparsebench.models import create_model

    rows = []
    sizes = (record.model, plan.full_size[family])
    for i, size_name in enumerate(sizes):
        if i > 0 and budget.left() <= 0:            # a cell started times at least one thing
            rows.append({**_skip(record, "time cap"), "timed_on": size_name})
            continue
        img = record.data["img_size"] if size_name == record.model else plan.img_size
        torch.manual_seed(0)
        dense = create_model(size_name, num_classes=record.data["num_classes"], img_size=img).to(plan.device).eval()
        realized, target = realize(dense, img)
        dense_macs, macs = count_macs(dense, (3, img, img)).macs, count_macs(realized, (3, img, img)).macs
        settings = LatencySettings(batch_sizes=plan.batches, rounds=plan.rounds, min_run_time=plan.min_run_time,
                                   max_seconds=budget.share((len(sizes) - i) * len(plan.batches)))
        timing = compare_latency(dense, realized, (3, img, img), settings, torch.device(plan.device))
        for bs, t in timing.items():
            rows.append({"method": record.method, "found_on": record.model, "timed_on": size_name,
                         "img_size": img, "target": target, "batch": int(bs),
                         "theoretical_speedup": dense_macs / macs, **_speed(t)})
    return rows


def _skip(record, why: str) -> dict:
    return {"method": record.method, "found_on": record.model, "status": f"skipped: {why}"}


def method_cells(plan: Plan, records_dir: Path) -> List[Cell]:
    from sparsebench.store.records import load_records

    records = [r for r in load_records(records_dir) if r.method in SEED_STRUCTURED and r.seed == 0] \
        if records_dir.exists() else []
    return [Cell("methods", f"{r.method} {r.model} {r.target_label}",
                 lambda budget, r=r: method_rows(plan, r, budget)) for r in records]


# --- quick --------------------------------------------------------------------------------------
def quick_cell(plan: Plan, out: Path) -> Cell:
    def run(budget: Budget) -> List[dict]:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "sparsebench", "sweep", "benchmarks/quick.yaml", *plan.quick_args,
               "--out", str(out / "quick"), "--quiet"]
        log = out / "quick.log"
        with open(log, "w") as f:
            # its own session: the sweep's workers are stopped with it at the cap, not left on the GPU
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
            try:
                code, status = proc.wait(timeout=max(1.0, budget.left())), "finished"
            except subprocess.TimeoutExpired:          # the cap: the runs finished so far are kept, on disk
                code, status = None, f"stopped at the time cap ({time.perf_counter() - start:.0f} s)"
            finally:                                   # also when this script is stopped (run.sh's limit)
                if proc.poll() is None:
                    _stop_group(proc)
        records = out / "quick" / "records"
        return [{"status": status, "returncode": code, "command": " ".join(cmd[1:]),
                 "records_written": len(list(records.glob("*.json"))) if records.exists() else 0,
                 "wall_seconds": time.perf_counter() - start}]

    return Cell("quick", "quick suite " + ("(the sweep's dry run)" if plan.dry else f"on {plan.device}"), run)


def _stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM to the process and the workers it started (its session), SIGKILL after 5 s."""
    import os
    import signal

    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- loop ---------------------------------------------------------------------------------------
def _loop_benchmark():
    """benchmarks/perf/test_loop_vs_timm.py, the one definition of both loops and of the ratio."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "perf" / "test_loop_vs_timm.py"
    spec = importlib.util.spec_from_file_location("loop_vs_timm", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def loop_cells(plan: Plan, out: Path) -> List[Cell]:
    batch, workers, blocks, steps = plan.loop

    def run(model: str, budget: Budget) -> List[dict]:
        import os

        bench = _loop_benchmark()
        root = out / "loop-photos"
        if not (root / "imagenet").exists():
            bench.write_photos(root, per_class=2 * batch)   # two batches an epoch, for each loader
        os.environ["SPARSEBENCH_ALLOW_PARTIAL_DATA"] = "1"  # 4 of ImageNet's 1000 classes
        result = bench.throughput_ratio(model, root, plan.device, batch=batch, workers=workers, blocks=blocks,
                                        steps=steps)
        return [{"model": model, "img_size": 224, "batch": batch, "workers": workers, "blocks": blocks,
                 "ours_per_timm_throughput": result["ratio"], "wall_clock_ratio": result["wall_ratio"],
                 "ours_ms_per_step": result["ours_s_per_step"] * 1e3,
                 "timm_ms_per_step": result["timm_s_per_step"] * 1e3, "status": "measured"}]

    # a cell's blocks are fixed (a ratio needs them all): one is not started with less than this left
    least = 20.0 if plan.dry else 12.0
    return [Cell("loop", f"{m} ours vs timm, batch {batch}", lambda budget, m=m: run(m, budget), min_seconds=least)
            for m in LOOP_MODELS]


def plan_cells(plan: Plan, out: Path, records_dir: Path, parts) -> List[Cell]:
    makers = {"structured": lambda: structured_cells(plan), "sparse24": lambda: sparse24_cells(plan),
              "methods": lambda: method_cells(plan, records_dir), "quick": lambda: [quick_cell(plan, out)],
              "loop": lambda: loop_cells(plan, out), "compile": lambda: compile_cells(plan),
              "unstructured": lambda: unstructured_cells(plan)}
    return [cell for part in parts for cell in makers[part]()]


# --- running, and the tables on disk ------------------------------------------------------------
class Tables:
    """Each part's table, written as each of its cells finishes."""

    def __init__(self, out: Path, plan: Plan, parts):
        self.out, self.plan = out, plan
        self.rows: Dict[str, List[dict]] = {part: [] for part in parts}
        self.summary: Dict[str, dict] = {part: {"part": part, "cap_s": plan.caps[part], "seconds": 0.0, "cells": 0,
                                                "cells_timed": 0, "cells_skipped": 0, "cells_failed": 0,
                                                "within_cap": True} for part in parts}

    def add(self, cell: Cell, rows: List[dict], seconds: float, part_seconds: float) -> None:
        from sparsebench.store.records import atomic_write_text

        rows = [{"cell": cell.label, **row, "cell_seconds": round(seconds, 3)} for row in rows]
        self.rows[cell.part] += rows
        with open(self.out / f"{cell.part}.jsonl", "a") as f:
            f.writelines(json.dumps(row, default=str) + "\n" for row in rows)
        self._write(cell.part, self.rows[cell.part])
        s = self.summary[cell.part]
        statuses = [str(row.get("status", "")) for row in rows]
        key = "cells_failed" if any(x.startswith("failed") for x in statuses) else \
            "cells_skipped" if all(x.startswith("skipped") for x in statuses) else "cells_timed"
        s.update({"seconds": round(part_seconds, 1), "cells": s["cells"] + 1, key: s[key] + 1,
                  "within_cap": part_seconds <= self.plan.caps[cell.part] + self.plan.grace})
        self._write("parts", list(self.summary.values()))
        atomic_write_text(self.out / "parts.json", json.dumps({"grace_s": self.plan.grace,
                                                               "parts": list(self.summary.values())}, indent=2))

    def _write(self, name: str, rows: List[dict]) -> None:
        import pandas as pd

        from sparsebench.store.records import atomic_write_text

        frame = pd.DataFrame(rows)
        atomic_write_text(self.out / f"{name}.csv", frame.to_csv(index=False))
        shown = frame.astype(object).where(frame.notna(), "")       # a skipped cell's empty columns, blank
        atomic_write_text(self.out / f"{name}.md", shown.to_markdown(index=False, floatfmt=".3g") + "\n")


def run_part(part: str, cells: List[Cell], plan: Plan, tables: Tables) -> None:
    """The part's cells within its cap: each gets its weight's share of the time left."""
    cap, start = plan.caps[part], time.perf_counter()
    for i, cell in enumerate(cells):
        left = cap - (time.perf_counter() - start)
        if left <= max(0.0, cell.min_seconds):
            rows = [{"status": f"skipped: time cap ({max(0.0, left):.1f} s of {cap:g} s left"
                               + (f", the cell needs {cell.min_seconds:g} s)" if cell.min_seconds else ")")}]
            tables.add(cell, rows, 0.0, time.perf_counter() - start)
            print(f"[{part}] {cell.label}: skipped (time cap)", flush=True)
            continue
        allowance = left * cell.weight / sum(c.weight for c in cells[i:])
        t0 = time.perf_counter()
        try:
            rows = cell.run(Budget(allowance)) or [{"status": "no rows"}]
        except Exception as exc:                 # one failing cell is recorded, the rest still run
            rows = [{"status": f"failed: {type(exc).__name__}: {exc}"}]
        seconds = time.perf_counter() - t0
        tables.add(cell, rows, seconds, time.perf_counter() - start)
        print(f"[{part}] {cell.label}: {len(rows)} rows in {seconds:.1f} s (allowance {allowance:.1f} s)", flush=True)


def check_imports() -> List[str]:
    """Everything the GPU plan calls, imported and resolved, without a GPU."""
    import torch.sparse  # noqa: F401
    from torch.sparse import to_sparse_semi_structured  # noqa: F401

    from sparsebench.measure.sparse24 import semi_structured_support
    from sparsebench.methods import METHODS
    from sparsebench.models import MODELS

    problems = []
    for name in STRUCTURED_MODELS + SPARSE24_MODELS + COMPILE_MODELS + tuple(GPU_PLAN.full_size.values()):
        try:
            MODELS.get(name)
        except Exception as exc:
            problems.append(f"model {name}: {exc}")
    for name in ("l1-channel",):
        METHODS.get(name)
    missing = [m for m in SEED_STRUCTURED if m not in METHODS.names()]
    if missing:
        print(f"note: seed methods not registered yet, their rows will be absent: {', '.join(missing)}")
    ok, why = semi_structured_support("cuda" if torch.cuda.is_available() else "cpu", torch.float16)
    print(f"2:4 kernels here: {'yes' if ok else 'no'} ({why})")
    return problems


def parse_caps(items: List[str]) -> Dict[str, float]:
    caps = {}
    for item in items:
        part, _, seconds = item.partition("=")
        if part not in GPU_CAPS_S or not re.fullmatch(r"\d+(\.\d+)?", seconds):
            raise SystemExit(f"error: bad --cap {item!r}; expected PART=SECONDS with PART one of "
                             f"{', '.join(GPU_CAPS_S)}")
        caps[part] = float(seconds)
    return caps


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true",
                        help="check imports, then run the plan on the CPU at stand-in size under the dry caps")
    parser.add_argument("--out", help="default results/speedup/cuda-<gpu name>; a new temporary folder for --dry-run")
    parser.add_argument("--records", default="results/quick", help="records whose seed-method structures to time")
    parser.add_argument("--parts", nargs="+", default=list(DEFAULT_PARTS), choices=list(GPU_CAPS_S))
    parser.add_argument("--cap", action="append", default=[], metavar="PART=SECONDS", help="override a part's cap")
    args = parser.parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return run_tables(args)
    # stopped from outside (run.sh's `timeout`): unwind, so that a running sweep is stopped with us
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return run_tables(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_tables(args) -> int:
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    plan = replace(plan, caps={**plan.caps, **parse_caps(args.cap)})
    if args.dry_run:
        problems = check_imports()
        for p in problems:
            print(f"error: {p}")
        if problems:
            return 1
    elif not torch.cuda.is_available():
        print("error: no CUDA device; the GPU tables need one (--dry-run runs the plan on the CPU at stand-in size)")
        return 2
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-tables-dry-")) if args.dry_run
                                          else Path(f"results/speedup/cuda-{gpu_slug()}"))
    cells = plan_cells(plan, out, Path(args.records), args.parts)
    for part in args.parts:
        labels = [c.label for c in cells if c.part == part]
        print(f"{part:<10} {len(labels):>3} cells, cap {plan.caps[part]:g} s: " + "; ".join(labels[:8])
              + (" ..." if len(labels) > 8 else ""), flush=True)
    out.mkdir(parents=True, exist_ok=True)
    write_environment(out, plan)
    if plan.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False      # fp32 means fp32
    tables = Tables(out, plan, args.parts)
    for part in args.parts:
        run_part(part, [c for c in cells if c.part == part], plan, tables)
    over = [s["part"] for s in tables.summary.values() if not s["within_cap"]]
    print(f"wrote {len(cells)} cells' rows under {out} (parts.md: seconds per part against its cap)"
          + (f"; over the cap: {', '.join(over)}" if over else ""))
    return 0


def write_environment(out: Path, plan: Plan) -> None:
    from sparsebench.measure.environment import code_version, environment
    from sparsebench.store.records import atomic_write_text

    env = {**environment(torch.device(plan.device), 1), "code_version": code_version(),
           "plan": {"dry_run": plan.dry, "img_size": plan.img_size, "batches": list(plan.batches),
                    "rounds": plan.rounds, "caps_s": plan.caps, "grace_s": plan.grace, "stand_in": plan.stand_in}}
    atomic_write_text(out / "environment.json", json.dumps(env, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())

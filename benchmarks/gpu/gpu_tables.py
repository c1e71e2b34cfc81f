"""The GPU tables: measured speedup on one CUDA GPU, written under results/speedup/cuda-<gpu>/.

Four parts, each timed dense vs realized in the same process on the same input
(`sparsebench.measure.latency.compare_latency`: CUDA events, synchronisation, warm-up,
alternating blocks, median and bootstrap interval):

1. structured  L1 channel/head pruning at FLOPs 0.75/0.5/0.25 of ResNet-18/50, MobileNetV2,
               DeiT-Tiny/Small/Base, compacted, at batch 1/64/256, fp32 and bf16, eager;
               torch.compile on for bf16 at FLOPs 0.5 (compilation dominates the time budget).
2. sparse24    2:4 semi-structured kernels on the Linear layers of DeiT-Small/Base in
               fp16/bf16: each MLP layer alone and the whole model, batch 1/64/256.
3. methods     the exported model of every structured seed-method record found (PASS,
               S²ViTE, OFB, SViTE+ drop), timed at its own size and scaled by keep ratio to
               the full-size model of its family.
4. quick       the quick suite on the GPU, one seed, every method: wall time and leaderboard.

Every part has a time cap; a cell left out for time is listed as such, never silently
missing. `--dry-run` prints the plan and checks that every model, method and kernel API it
needs imports, on any machine (CI runs it).
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, List

import torch

STRUCTURED_MODELS = ("resnet18", "resnet50", "mobilenet_v2", "deit_tiny", "deit_small", "deit_base")
FLOPS = (0.75, 0.5, 0.25)
BATCHES = (1, 64, 256)
SPARSE24_MODELS = ("deit_small", "deit_base")
SEED_STRUCTURED = ("pass", "s2vite", "ofb", "svite-plus")
FULL_SIZE = {"cnn": "resnet50", "vit": "deit_small"}
DEVICE = "cuda"          # the methods part runs on CPU too, for its tests
CAPS_S = {"structured": 200, "sparse24": 70, "methods": 60, "quick": 120}   # 450 s of work, within 8 min


@dataclass(frozen=True)
class Cell:
    part: str
    label: str
    run: Callable[[], List[dict]]


def gpu_slug() -> str:
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def structured_cells() -> List[Cell]:
    from sparsebench.runners.speedup import SpeedupConfig, speedup_rows

    base = SpeedupConfig(models=(), flops=FLOPS, img_size=224, batch_sizes=BATCHES, threads=(1,), device="cuda",
                         rounds=6)
    cells = []
    for dtype in ("float32", "bfloat16"):
        for model in STRUCTURED_MODELS:
            config = replace(base, models=(model,), dtype=dtype)
            cells.append(Cell("structured", f"{model} {dtype} eager", lambda c=config: speedup_rows(c)))
    for model in STRUCTURED_MODELS:
        config = replace(base, models=(model,), flops=(0.5,), dtype="bfloat16", compile=True)
        cells.append(Cell("structured", f"{model} bfloat16 compile", lambda c=config: speedup_rows(c)))
    return cells


def sparse24_rows(model_name: str, dtype_name: str) -> List[dict]:
    """Per-MLP-layer and whole-model 2:4 speedup; every Linear left dense is listed with its reason."""
    import copy

    from torch import nn

    from sparsebench.measure.latency import LatencySettings, compare_latency
    from sparsebench.measure.sparse24 import prune_2to4_, semi_structured_support, to_semi_structured
    from sparsebench.models import create_model

    dtype = getattr(torch, dtype_name)
    ok, why = semi_structured_support("cuda", dtype)
    if not ok:
        return [{"model": model_name, "dtype": dtype_name, "scope": "all", "status": f"not realizable: {why}"}]
    torch.manual_seed(0)
    dense = create_model(model_name, num_classes=1000, img_size=224).cuda().to(dtype).eval()
    pruned = copy.deepcopy(dense)
    for name, m in pruned.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("blocks."):
            prune_2to4_(m)
    sparse, converted, skipped = to_semi_structured(pruned, dtype)
    settings = LatencySettings(batch_sizes=BATCHES, dtype=dtype_name, rounds=6)
    rows = []
    tokens = dense.patch_embed.num_patches + dense.num_prefix_tokens
    for layer in ("fc1", "fc2"):
        lin_dense = getattr(pruned.blocks[0].mlp, layer)
        lin_sparse = getattr(sparse.blocks[0].mlp, layer)
        for bs in BATCHES:
            # a Linear on (batch·tokens, in): the shape the MLP sees inside the model
            t = compare_latency(_Flat(lin_dense), _Flat(lin_sparse), (tokens * bs // bs, lin_dense.in_features),
                                replace(settings, batch_sizes=(bs,)), torch.device("cuda"))[str(bs)]
            rows.append({"model": model_name, "dtype": dtype_name, "scope": f"blocks.0.mlp.{layer}", "batch": bs,
                         "shape": list(lin_dense.weight.shape), **_speed(t)})
    timing = compare_latency(dense, sparse, (3, 224, 224), settings, torch.device("cuda"))
    for bs, t in timing.items():
        rows.append({"model": model_name, "dtype": dtype_name, "scope": "whole model", "batch": int(bs),
                     "converted_linears": converted, "dense_linears": len(skipped), **_speed(t)})
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
            "status": "measured"}


def sparse24_cells() -> List[Cell]:
    return [Cell("sparse24", f"{m} {d}", lambda m=m, d=d: sparse24_rows(m, d))
            for m in SPARSE24_MODELS for d in ("float16", "bfloat16")]


def scaled_keep(ratios: List[float], n: int) -> List[float]:
    """Keep ratios of `len(ratios)` ordered groups mapped onto `n` groups by relative position."""
    if not ratios:
        return [1.0] * n
    return [ratios[min(len(ratios) - 1, round(i * (len(ratios) - 1) / max(1, n - 1)))] for i in range(n)]


def method_rows(record) -> List[dict]:
    """Time a record's structure on the GPU: at the size it was found, and scaled by keep ratio
    onto the full-size model of its family (which units are kept does not change latency)."""
    from sparsebench.methods.baselines import unit_space
    from sparsebench.models import model_family

    structure = record.structure or {}
    family = model_family(record.model)
    if record.method == "svite-plus":
        return token_drop_rows(record)
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

    return _timed_at_both_sizes(record, family, compacted)


def token_drop_rows(record) -> List[dict]:
    """SViTE+ in drop mode: the same keep ratio of tokens, at its own size and on DeiT-Small."""
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
        insert_selector(model, TokenSelector(dense.embed_dim, keep, dense.num_prefix_tokens, mode="drop").to(DEVICE))
        return model.eval(), f"{record.target_label}, tokens {keep}/{n}"

    return _timed_at_both_sizes(record, "vit", dropped)


def _timed_at_both_sizes(record, family: str, realize) -> List[dict]:
    """Dense vs `realize(dense, img)` at the record's own size and on the family's full-size model."""
    from sparsebench.measure.flops import count_macs
    from sparsebench.measure.latency import compare_latency
    from sparsebench.models import create_model

    rows = []
    for size_name in (record.model, FULL_SIZE[family]):
        img = record.data["img_size"] if size_name == record.model else 224
        torch.manual_seed(0)
        dense = create_model(size_name, num_classes=record.data["num_classes"], img_size=img).to(DEVICE).eval()
        realized, target = realize(dense, img)
        dense_macs, macs = count_macs(dense, (3, img, img)).macs, count_macs(realized, (3, img, img)).macs
        timing = compare_latency(dense, realized, (3, img, img), _method_timing(), torch.device(DEVICE))
        for bs, t in timing.items():
            rows.append({"method": record.method, "found_on": record.model, "timed_on": size_name,
                         "img_size": img, "target": target, "batch": int(bs),
                         "theoretical_speedup": dense_macs / macs, **_speed(t)})
    return rows


def _method_timing():
    from sparsebench.measure.latency import LatencySettings

    if DEVICE == "cuda":
        return LatencySettings(batch_sizes=BATCHES, rounds=6)
    return LatencySettings(batch_sizes=(1,), rounds=2, min_run_time=0.01)     # the CPU test's smoke timing


def _skip(record, why: str) -> dict:
    return {"method": record.method, "found_on": record.model, "status": f"skipped: {why}"}


def method_cells(records_dir: Path) -> List[Cell]:
    from sparsebench.store.records import load_records

    records = [r for r in load_records(records_dir) if r.method in SEED_STRUCTURED and r.seed == 0] \
        if records_dir.exists() else []
    return [Cell("methods", f"{r.method} {r.model} {r.target_label}", lambda r=r: method_rows(r)) for r in records]


def quick_cell(out: Path) -> Cell:
    def run() -> List[dict]:
        start = time.perf_counter()
        cmd = [sys.executable, "-m", "sparsebench", "sweep", "benchmarks/quick.yaml", "--device", "cuda",
               "--out", str(out / "quick"), "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        (out / "quick.log").write_text(proc.stdout + proc.stderr)
        return [{"part": "quick", "returncode": proc.returncode, "wall_seconds": time.perf_counter() - start}]

    return Cell("quick", "quick suite on cuda", run)


def plan(out: Path, records_dir: Path) -> List[Cell]:
    return structured_cells() + sparse24_cells() + method_cells(records_dir) + [quick_cell(out)]


def check_imports() -> List[str]:
    """Everything the plan calls, imported and resolved, without a GPU."""
    import torch.sparse  # noqa: F401
    from torch.sparse import to_sparse_semi_structured  # noqa: F401

    from sparsebench.measure.sparse24 import semi_structured_support
    from sparsebench.methods import METHODS
    from sparsebench.models import MODELS

    problems = []
    for name in STRUCTURED_MODELS + SPARSE24_MODELS + tuple(FULL_SIZE.values()):
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and check imports; time nothing")
    parser.add_argument("--out", help="default results/speedup/cuda-<gpu name>")
    parser.add_argument("--records", default="results/quick", help="records whose seed-method structures to time")
    parser.add_argument("--parts", nargs="+", default=list(CAPS_S), choices=list(CAPS_S))
    args = parser.parse_args(argv)
    out = Path(args.out or f"results/speedup/cuda-{gpu_slug()}")
    cells = [c for c in plan(out, Path(args.records)) if c.part in args.parts]
    for part in args.parts:
        labels = [c.label for c in cells if c.part == part]
        print(f"{part:<10} {len(labels):>3} cells, cap {CAPS_S[part]} s: " + "; ".join(labels[:8])
              + (" ..." if len(labels) > 8 else ""))
    if args.dry_run:
        problems = check_imports()
        for p in problems:
            print(f"error: {p}")
        print(f"dry run: {len(cells)} cells planned, output {out}")
        return 1 if problems else 0
    if not torch.cuda.is_available():
        print("error: no CUDA device; the GPU tables need one (use --dry-run to check the plan)")
        return 2
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False      # fp32 means fp32
    results = {part: [] for part in args.parts}
    part_start = {}
    for cell in cells:
        start = part_start.setdefault(cell.part, time.perf_counter())
        if time.perf_counter() - start > CAPS_S[cell.part]:
            results[cell.part].append({"cell": cell.label, "status": "skipped: part time cap reached"})
            print(f"[{cell.part}] {cell.label}: skipped (time cap)", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            rows = cell.run()
        except Exception as exc:                 # one failing cell is recorded, the rest still run
            rows = [{"cell": cell.label, "status": f"failed: {type(exc).__name__}: {exc}"}]
        results[cell.part] += rows
        print(f"[{cell.part}] {cell.label}: {len(rows)} rows in {time.perf_counter() - t0:.1f} s", flush=True)
    write_tables(out, results)
    return 0


def write_tables(out: Path, results: dict) -> None:
    import pandas as pd

    from sparsebench.measure.environment import code_version, environment

    for part, rows in results.items():
        if not rows:
            continue
        frame = pd.DataFrame(rows)
        frame.to_csv(out / f"{part}.csv", index=False)
        (out / f"{part}.md").write_text(frame.to_markdown(index=False, floatfmt=".3g") + "\n")
    env = {**environment(torch.device("cuda"), 1), "code_version": code_version()}
    (out / "environment.json").write_text(json.dumps(env, indent=2, default=str))
    print("wrote " + ", ".join(sorted(str(p) for p in out.iterdir())))


if __name__ == "__main__":
    sys.exit(main())

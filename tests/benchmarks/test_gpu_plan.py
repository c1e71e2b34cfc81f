"""The GPU tables script: its dry run completes the whole plan on a CPU within its caps, writing each
cell's rows as the cell finishes; its re-timing step runs whatever the tables step did."""
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_tables", ROOT / "benchmarks/gpu/gpu_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


DRY_CAPS = {"structured": 8, "sparse24": 2, "unstructured": 6, "methods": 5, "quick": 5, "loop": 60}


@pytest.mark.slow
def test_dry_run_writes_every_cells_rows_as_it_finishes_within_the_caps(tmp_path, monkeypatch):
    """The dry mode runs the whole plan on the CPU at stand-in size: every planned cell has rows in
    its part's table (timed, or "skipped: time cap"), each cell's rows are on disk before the next
    cell starts, every part ends within its cap plus the grace, and a cell that starts measures."""
    import pandas as pd

    gpu = _module()
    planned, on_disk_at_start = {}, {}
    make_cells = gpu.plan_cells

    def watched_cells(plan, out, records_dir, parts):
        cells = make_cells(plan, out, records_dir, parts)

        def watch(cell):
            def run(budget):
                table = out / f"{cell.part}.jsonl"
                rows = [json.loads(line) for line in table.read_text().splitlines()] if table.exists() else []
                on_disk_at_start[cell.label] = {row["cell"] for row in rows}
                return cell.run(budget)
            return gpu.Cell(cell.part, cell.label, run, cell.weight, cell.min_seconds)

        for cell in cells:
            planned.setdefault(cell.part, []).append(cell.label)
        return [watch(c) for c in cells]

    monkeypatch.setattr(gpu, "plan_cells", watched_cells)
    out = tmp_path / "dry"
    caps = [f"--cap={part}={seconds}" for part, seconds in DRY_CAPS.items()]
    start = time.perf_counter()
    assert gpu.main(["--dry-run", "--out", str(out), *caps]) == 0
    wall = time.perf_counter() - start
    assert set(planned) == set(DRY_CAPS) and len(planned["structured"]) == 12 and len(planned["sparse24"]) == 4
    assert len(planned["unstructured"]) == 2
    for part, labels in planned.items():
        table = pd.read_csv(out / f"{part}.csv")
        assert set(table["cell"]) == set(labels), part
        assert (out / f"{part}.md").read_text().startswith("| cell")
        for i, label in enumerate(labels):
            if label in on_disk_at_start:                    # started: every earlier cell of its part was written
                assert set(labels[:i]) <= on_disk_at_start[label], (part, label)
                if part in ("structured", "unstructured", "methods"):
                    rows = table[table["cell"] == label]
                    assert (rows["status"] == "measured").any(), (part, label)
    summary = json.loads((out / "parts.json").read_text())
    grace = summary["grace_s"]
    for row in summary["parts"]:
        assert row["within_cap"] and row["seconds"] <= DRY_CAPS[row["part"]] + grace, row
        assert row["cells"] == len(planned[row["part"]])
    assert wall < sum(DRY_CAPS.values()) + len(DRY_CAPS) * grace + 30      # + start-up and imports
    assert json.loads((out / "environment.json").read_text())["plan"]["dry_run"] is True


@pytest.mark.slow
def test_the_script_retimes_even_when_the_tables_step_is_stopped(tmp_path):
    """run.sh's second step runs after the first was stopped at its limit; the dry run re-times a
    copy of the committed records, which stay as they were; the exit status is the first step's."""
    import hashlib
    import os

    evidence = ROOT / "results" / "evidence"
    with_models = sorted(p.stem for p in (evidence / "models").glob("*.safetensors"))
    digest = lambda: {i: hashlib.sha256((evidence / "records" / f"{i}.json").read_bytes()).hexdigest()  # noqa: E731
                      for i in with_models}
    before = digest()
    # two directories with saved models (quick, evidence): 2 × (24 + 25) s reserved for step 2
    env = {**os.environ, "GPU_SCRIPT_S": "120", "TABLES_S": "2", "RETIME_S": "24", "LEADERBOARD_S": "25"}
    start = time.perf_counter()
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env=env, timeout=200)
    assert time.perf_counter() - start < 120 + 15, proc.stdout
    assert proc.returncode == 124, proc.stdout + proc.stderr
    assert "gpu tables: exit 124 (stopped at its 2 s limit)" in proc.stdout and "re-timing runs anyway" in proc.stdout
    copy = tmp_path / "retime" / "evidence"
    assert sorted(p.stem for p in (copy / "models").glob("*.safetensors")) == with_models
    assert "retimed " in proc.stdout and (copy / "leaderboard.md").exists(), proc.stdout + proc.stderr
    assert digest() == before


def test_without_cuda_a_real_run_refuses_in_one_line(tmp_path):
    gpu = _module()
    if gpu.torch.cuda.is_available():
        return
    assert gpu.main(["--parts", "sparse24", "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()


def test_keep_ratios_scale_by_relative_position():
    gpu = _module()
    assert gpu.scaled_keep([1.0, 0.5], 4) == [1.0, 1.0, 0.5, 0.5]
    assert gpu.scaled_keep([0.25], 3) == [0.25, 0.25, 0.25]
    assert gpu.scaled_keep([0.1, 0.2, 0.3], 3) == [0.1, 0.2, 0.3]
    assert gpu.scaled_keep([], 2) == [1.0, 1.0]


def test_seed_method_structures_are_timed_on_any_device():
    """The methods part on CPU: each structured seed method's committed quick-suite structure is
    rebuilt, compacted (or its tokens dropped) and timed against its dense model."""
    gpu = _module()
    cells = gpu.method_cells(gpu.DRY_PLAN, ROOT / "results" / "quick")      # small stand-ins for the full size
    methods = {c.label.split()[0] for c in cells}
    assert {"pass", "s2vite", "ofb", "svite-plus"} <= methods
    for cell in cells:
        if not cell.label.endswith("flops=0.5") and "svite-plus" not in cell.label:
            continue
        rows = cell.run(gpu.Budget(60))
        assert rows and all(r["status"] == "measured" for r in rows), rows
        assert all(r["measured_speedup"] > 0 and r["theoretical_speedup"] >= 1 for r in rows)

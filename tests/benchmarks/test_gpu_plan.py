"""The GPU tables script: its dry run plans every part and resolves every model, on any machine."""
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _module():
    spec = importlib.util.spec_from_file_location("gpu_tables", ROOT / "benchmarks/gpu/gpu_tables.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_dry_run_plans_every_part_and_exits_zero():
    proc = subprocess.run(["bash", str(ROOT / "benchmarks/gpu/run.sh"), "--dry-run"], capture_output=True,
                          text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for part in ("structured", "sparse24", "methods", "quick"):
        assert any(line.startswith(part) for line in proc.stdout.splitlines()), proc.stdout
    assert re.search(r"^structured +18 cells", proc.stdout, re.M) and re.search(r"^sparse24 +4 cells", proc.stdout, re.M)
    assert "error:" not in proc.stdout


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


def test_seed_method_structures_are_timed_on_any_device(monkeypatch):
    """The methods part on CPU: each structured seed method's committed quick-suite structure is
    rebuilt, compacted (or its tokens dropped) and timed against its dense model."""
    gpu = _module()
    monkeypatch.setattr(gpu, "DEVICE", "cpu")
    monkeypatch.setattr(gpu, "FULL_SIZE", {"cnn": "resnet20_tiny", "vit": "vit_cifar_tiny"})   # small stand-ins
    cells = gpu.method_cells(ROOT / "results" / "quick")
    methods = {c.label.split()[0] for c in cells}
    assert {"pass", "s2vite", "ofb", "svite-plus"} <= methods
    for cell in cells:
        if not cell.label.endswith("flops=0.5") and "svite-plus" not in cell.label:
            continue
        rows = cell.run()
        assert rows and all(r["status"] == "measured" for r in rows), rows
        assert all(r["measured_speedup"] > 0 and r["theoretical_speedup"] >= 1 for r in rows)

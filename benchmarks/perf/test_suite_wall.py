"""The sweep itself: a scaled-down quick suite run serially (`--jobs 1`) and with the default
`--jobs auto`, each from a fresh output directory (its own dense pretrain), as a user runs it.

Reports the wall ratio (auto / serial), the peak memory of the sweep and its workers together
(proportional set size, shared pages counted once) and, in each mode, the spread of the `dense` rows'
measured speedup: the dense model timed against a copy of itself, so every deviation from
1.00 is timing noise, and a parallel sweep whose timing section did not keep the other
workers quiet would show it here. Full mode asserts the bounds (dense rows within
[0.95, 1.05] in both modes; parallel faster than serial; parallel within the quick suite's
1.5 GB memory goal); short mode (CI) runs a smaller
suite and fails only on errors: a run not done, a dense row not timed, a parallel latency
entry not timed exclusively.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_perf import SHORT, check_bound, finite

SEEDS = [0, 1] if SHORT else [0, 1, 2]
MODELS = ["resnet20_tiny"] if SHORT else ["resnet20_tiny", "vit_cifar_tiny"]
# short: the 2 dense runs per mode (each its own tiny pretrain), 2 short timing blocks (seconds, not a measurement).
# full: the quick suite's mix in small: pruning runs (mostly measurement) and scratch methods that train for the
# pretrain budget (rigl, gmp), so the wall ratio weighs training as the quick suite does, not timing alone
SUITE = f"""
name: wall
methods: {'[dense]' if SHORT else '[dense, magnitude-global, l1-channel, rigl, gmp]'}
models: [{', '.join(MODELS)}]
datasets: [digits]
targets: {{sparsity: [0.5], flops: [0.5]}}
seeds: {SEEDS}
recipe: {{batch_size: 64, pretrain_epochs: {0.3 if SHORT else 3}, finetune_epochs: {0.2 if SHORT else 1}}}
data: {{img_size: 16, val_fraction: 0.1}}
measure: {{threads: 1, batch_sizes: [1, 64], rounds: {2 if SHORT else 6}{', min_run_time: 0.02' if SHORT else ''}}}
"""
ROOT = Path(__file__).resolve().parents[2]
MEMORY_GOAL_BYTES = 1.5 * 2**30


def _sweep(suite: Path, out: Path, jobs: str) -> tuple:
    """(wall seconds, peak memory in bytes of the sweep and its workers together, or None without /proc)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "sparsebench", "sweep", str(suite), "--out", str(out),
                             "--jobs", jobs, "--quiet"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    peak = _PeakMemory(proc.pid)
    _, err = proc.communicate(timeout=1800)
    wall = time.perf_counter() - start
    peak.stop()
    assert proc.returncode == 0, err[-2000:]
    return wall, peak.bytes


class _PeakMemory(threading.Thread):
    """The largest proportional set size (PSS: a page shared by k processes counts 1/k in each) that a
    process and its descendants held together, sampled every 0.2 s: what the sweep costs the machine,
    with the memory its workers share with it counted once."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.bytes, self._done = pid, None, threading.Event()
        if Path("/proc/self/smaps_rollup").exists():
            self.bytes = 0
            self.start()

    def run(self) -> None:
        while not self._done.wait(0.2):
            self.bytes = max(self.bytes, sum(_pss(p) for p in _tree(self.pid)))

    def stop(self) -> None:
        self._done.set()
        if self.is_alive():
            self.join()


def _tree(root: int) -> list:
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _records(out: Path) -> list:
    return [json.loads(p.read_text()) for p in sorted((out / "records").glob("*.json"))]


def _dense_speedups(records: list) -> list:
    rows = [r for r in records if r["method"] == "dense"]
    assert len(rows) == len(SEEDS) * len(MODELS) and all(r["measured_speedup"] for r in rows)
    return [r["measured_speedup"] for r in rows]


def test_suite_wall_serial_and_parallel(benchmark, tmp_path):
    suite = tmp_path / "wall.yaml"
    suite.write_text(SUITE)
    walls, peaks = {}, {}

    def both():
        for jobs in ("1", "auto"):
            walls[jobs], peaks[jobs] = _sweep(suite, tmp_path / f"out-{jobs}", jobs)

    benchmark.pedantic(both, rounds=1, iterations=1)
    serial, parallel = _records(tmp_path / "out-1"), _records(tmp_path / "out-auto")
    assert len(serial) == len(parallel) > 0 and all(r["status"] == "ok" for r in serial + parallel)
    timed = [e for r in parallel if r["latency"] for k, e in r["latency"].items() if k != "settings"]
    assert timed and all(e["exclusive"] is True for e in timed)      # the timing section held in every entry
    spreads = {}
    for mode, records in (("serial", serial), ("auto", parallel)):
        speedups = _dense_speedups(records)
        finite(*speedups)
        spreads[mode] = (min(speedups), max(speedups))
    ratio = walls["auto"] / walls["1"]
    finite(ratio)
    benchmark.extra_info.update({"wall_serial_s": round(walls["1"], 1), "wall_auto_s": round(walls["auto"], 1),
                                 "wall_ratio": round(ratio, 3), "runs": len(serial),
                                 "dense_speedup_serial": [round(v, 3) for v in spreads["serial"]],
                                 "dense_speedup_auto": [round(v, 3) for v in spreads["auto"]],
                                 "peak_pss_mb_serial": peaks["1"] and round(peaks["1"] / 2**20),
                                 "peak_pss_mb_auto": peaks["auto"] and round(peaks["auto"] / 2**20)})
    print(f"suite of {len(serial)} runs: serial {walls['1']:.1f} s, --jobs auto {walls['auto']:.1f} s "
          f"(ratio {ratio:.2f}); dense rows' measured speedup: serial {spreads['serial'][0]:.3f}–"
          f"{spreads['serial'][1]:.3f}, auto {spreads['auto'][0]:.3f}–{spreads['auto'][1]:.3f}"
          + (f"; peak memory (PSS, sweep and workers) serial {peaks['1'] / 2**20:.0f} MB, "
             f"auto {peaks['auto'] / 2**20:.0f} MB" if peaks["auto"] is not None else ""))
    for mode, (lo, hi) in spreads.items():
        check_bound(0.95 <= lo and hi <= 1.05, f"dense rows' measured speedup {lo:.3f}–{hi:.3f} ({mode}) "
                                               f"outside [0.95, 1.05]")
    if peaks["auto"] is not None:        # the README's goal for the quick suite, on this smaller one
        check_bound(peaks["auto"] <= MEMORY_GOAL_BYTES, f"--jobs auto peaked at {peaks['auto'] / 2**20:.0f} MB "
                                                        f"(PSS), above {MEMORY_GOAL_BYTES / 2**20:.0f} MB")
    if (os.cpu_count() or 1) > 1:
        check_bound(ratio < 0.9, f"--jobs auto took {ratio:.2f} of the serial wall time")

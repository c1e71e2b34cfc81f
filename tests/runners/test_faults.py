"""Fault injection: a small sweep is killed with SIGKILL at ten random moments and resumed each
time; in the end every run is recorded exactly once, no record is ever lost or rewritten, and
every record parses."""
import json
import multiprocessing as mp
import os
import random
import signal
import textwrap
import time

import pytest
import torch

from sparsebench.runners.pipeline import resolve
from sparsebench.runners.suite import load_suite

SUITE = textwrap.dedent("""
    name: faults
    methods: [dense, magnitude-global]
    models: [resnet20_tiny]
    datasets: [digits]
    targets: {sparsity: [0.5, 0.8]}
    seeds: [0, 1, 2]
    recipe: {pretrain_epochs: 8.0, finetune_epochs: 5.0, search_epochs: 0.2}   # ~10 s uncut: longer than the ten cuts
    data: {img_size: 16}
    measure: {latency: false}
""")


def _sweep(suite, out):
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    from sparsebench.cli import main

    os._exit(main(["sweep", str(suite), "--jobs", "1", "--out", str(out), "--quiet"]))


def _records(out):
    folder = out / "records"
    return {p.name: p.stat().st_mtime_ns for p in folder.glob("*.json")} if folder.exists() else {}


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="forks the sweep (fast restarts)")
def test_a_sweep_killed_ten_times_records_every_run_exactly_once(tmp_path):
    suite = tmp_path / "faults.yaml"
    suite.write_text(SUITE)
    out = tmp_path / "out"
    expected = {f"{resolve(s).run_id}.json" for s in load_suite(suite).specs}
    assert len(expected) == 9
    ctx = mp.get_context("fork")          # the test process has torch imported: restarts take milliseconds
    rng = random.Random(1234)
    seen = {}
    kills = 0
    for _ in range(10):
        proc = ctx.Process(target=_sweep, args=(suite, out))
        proc.start()
        time.sleep(rng.uniform(0.05, 1.0))     # the whole sweep takes longer than ten of these
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.join()
        now = _records(out)
        assert {k: now[k] for k in seen} == seen          # a finished run is never lost nor run again
        assert set(now) <= expected
        seen = now
    assert kills >= 8                                     # the cycles were really cut short
    proc = ctx.Process(target=_sweep, args=(suite, out))
    proc.start()
    proc.join(timeout=120)
    assert proc.exitcode == 0
    final = _records(out)
    assert set(final) == expected and {k: final[k] for k in seen} == seen
    hashes = []
    for name in final:
        record = json.loads((out / "records" / name).read_text())
        assert f"{record['run_id']}.json" == name
        hashes.append(record["spec_hash"])
    assert len(set(hashes)) == len(expected)
    assert not [p for p in (out / "records").iterdir() if p.suffix == ".json" and p.name not in expected]
    for ckpt in (out / "checkpoints").glob("dense-*.pt"):
        assert torch.load(ckpt, weights_only=True)["meta"]["steps"] > 0

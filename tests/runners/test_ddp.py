"""A run under torch.distributed (2 CPU processes, gloo): DDP training on each rank's half of every
global batch, masks identical on every rank, one record written by rank 0, the same record as one
process where the arithmetic says so, and a mid-run kill resumed under DDP."""
import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp_mp

from sparsebench.specs import MeasureSpec, Recipe
from tests.conftest import Killed, kill_after, tiny_spec

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built in")

# A ViT: no BatchNorm and no dropout, so the mean of the two ranks' gradients is the one-process
# gradient of the same global batch (up to floating-point summation order). SGD, not Adam: Adam
# divides by sqrt(v), so tiny gradients whose last bits differ take full-size steps apart and the
# two runs drift apart within tens of steps; SGD keeps float noise at float-noise size.
RECIPE = Recipe(batch_size=64, pretrain_epochs=0.5, finetune_epochs=0.3, search_epochs=0.2,
                optimizer="sgd", lr=0.05, finetune_lr=0.01, weight_decay=5e-4)


def spec():
    return tiny_spec("magnitude-global", model="vit_cifar_tiny", target="sparsity=0.5", recipe=RECIPE,
                     measure=MeasureSpec(latency=False, threads=1))


def _capture_masks(monkeypatch, where):
    """Save the run's final masks; and no augmentation: digits' random shift draws from the global RNG
    per sample, so under DDP each rank draws its own stream for its half of the batch, and the shifts
    differ from one process's (a documented difference, not float noise)."""
    from sparsebench.datasets.digits import RandomShift
    from sparsebench.runners import pipeline

    monkeypatch.setattr(RandomShift, "__call__", lambda self, x: x)

    original = pipeline.finetune_stage

    def finetune_stage(spec, outcome, *args, **kwargs):
        result = original(spec, outcome, *args, **kwargs)
        torch.save({n: m.clone() for n, m in outcome.masks.masks.items()}, where)
        return result

    monkeypatch.setattr(pipeline, "finetune_stage", finetune_stage)


def _rank(rank, world, tmp, out, kill_at):
    from _pytest.monkeypatch import MonkeyPatch

    from sparsebench.runners.pipeline import RunOptions, execute

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init-{kill_at}", rank=rank, world_size=world)
    mp = MonkeyPatch()
    try:
        _capture_masks(mp, tmp / f"masks-{rank}.pt")
        if kill_at:
            kill_after(mp, kill_at)
        try:
            record = execute(spec(), RunOptions(out=out, checkpoint_every=3))
        except Killed:
            return
        (tmp / f"record-{rank}.json").write_text(record.to_json())
    finally:
        mp.undo()
        dist.destroy_process_group()


def _spawn(tmp, out, kill_at=0):
    tmp_mp.spawn(_rank, args=(2, tmp, out, kill_at), nprocs=2, join=True)


EXACT = ("achieved_sparsity", "achieved_sparsity_all_params", "achieved_flops_ratio", "params", "macs",
         "test_samples", "status", "data", "model", "method", "spec_hash")


@pytest.mark.slow
def test_ddp_run_matches_one_process_and_resumes(tmp_path, monkeypatch):
    from sparsebench.runners.pipeline import RunOptions, execute

    os.environ.setdefault("PYTHONPATH", os.getcwd())
    one = tmp_path / "one"
    _capture_masks(monkeypatch, tmp_path / "masks-single.pt")
    single = json.loads(execute(spec(), RunOptions(out=one, checkpoint_every=None)).to_json())

    ddp = tmp_path / "ddp"
    _spawn(tmp_path, ddp)
    records = [json.loads((tmp_path / f"record-{r}.json").read_text()) for r in range(2)]
    written = list((ddp / "records").glob("*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["test_top1"] == records[0]["test_top1"]
    masks = [torch.load(tmp_path / f"masks-{r}.pt") for r in range(2)]
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])       # identical on every rank
    assert records[0]["environment"]["world_size"] == 2

    for field in EXACT:
        assert records[0][field] == single[field], field
    for part in ("method_steps", "finetune_steps", "dense_pretrain_steps"):
        assert records[0]["cost"][part] == single["cost"][part], part
    assert records[0]["cost"]["train_macs"]["finetune"] == single["cost"]["train_macs"]["finetune"]
    # the same global batches and mean gradient: the same model up to float summation order
    alone = torch.load(tmp_path / "masks-single.pt")
    agree = sum(int((alone[n] == masks[0][n]).sum()) for n in alone) / sum(m.numel() for m in alone.values())
    print(f"mask agreement DDP vs one process: {agree:.5f}; top-1 {records[0]['test_top1']:.4f} vs {single['test_top1']:.4f}")
    assert agree > 0.999
    dense = [torch.load(next((d / "checkpoints").glob("dense-*.pt")), weights_only=True)["state_dict"]
             for d in (one, ddp)]
    assert max(float((dense[0][k] - dense[1][k]).abs().max()) for k in dense[0]) < 1e-4
    assert abs(records[0]["test_top1"] - single["test_top1"]) <= 0.03

    # killed mid-run on both ranks, then resumed: the same record as the uninterrupted DDP run
    again = tmp_path / "resumed"
    _spawn(tmp_path, again, kill_at=15)      # in the fine-tune, after its step-3 checkpoint
    assert not list((again / "records").glob("*.json")) and list(again.glob("**/fit-*.pt"))
    _spawn(tmp_path, again)
    resumed = json.loads(next((again / "records").glob("*.json")).read_text())
    assert resumed["cost"]["resumed_fits"] >= 1
    assert resumed["test_top1"] == records[0]["test_top1"] and resumed["val_top1"] == records[0]["val_top1"]


@pytest.mark.slow
def test_sparsebench_run_under_torchrun_writes_one_record_and_prints_once(tmp_path):
    """The real entry: torchrun's environment variables, `cmd_run` joining the group (gloo)."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "sparsebench", "run", "--method", "magnitude-global", "--model", "resnet20_tiny", "--dataset",
           "digits", "--target", "sparsity=0.5", "--img-size", "16", "--recipe", "pretrain_epochs=0.3",
           "--recipe", "finetune_epochs=0.2", "--no-latency", "--quiet", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote ") == 1 and done.stdout.count("top1 ") == 1      # rank 0 speaks alone
    records = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert len(records) == 1 and records[0]["status"] == "ok" and records[0]["environment"]["world_size"] == 2

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
    """Save the run's final masks; and no augmentation: under DDP each rank draws its random shifts
    from its own stream for its half of the batch, so the shifts differ from one process's (a
    documented difference, not float noise)."""
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


# --- per-rank data, a NaN on one rank, sharded evaluation (2 gloo processes, seconds each) -------
GROUP_TIMEOUT_S = 20      # a collective left waiting shows as a timeout error, not a 30-minute hang


def _in_group(rank, world, tmp, jobs):
    """Rank `rank` of a gloo group with a short timeout runs each `job(rank, tmp)` in turn; its answers
    land in tmp/answers-<rank>.json by job name."""
    from datetime import timedelta

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    try:
        answers = {job.__name__: job(rank, tmp) for job in jobs}
    finally:
        dist.destroy_process_group()
    (tmp / f"answers-{rank}.json").write_text(json.dumps(answers))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The answers of both ranks to every job below, from one group (one spawn for the three tests)."""
    tmp = tmp_path_factory.mktemp("ranks")
    jobs = (_draws_of_each_rank, _evaluate_shards, _bad_buffer_on_rank_one,
            _nan_on_rank_one)                                             # the NaN last: it leaves DDP mid-step
    tmp_mp.spawn(_in_group, args=(2, tmp, jobs), nprocs=2, join=True)
    answers = [json.loads((tmp / f"answers-{r}.json").read_text()) for r in range(2)]
    return {job.__name__: [a[job.__name__] for a in answers] for job in jobs}


class RandomDraws(torch.utils.data.Dataset):
    """Sample i: its index and one draw each from torch, python and numpy (an augmentation's randomness)."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, i):
        import random

        import numpy as np

        return torch.tensor([float(i), float(torch.rand(())), random.random(), float(np.random.rand())],
                            dtype=torch.float64), 0


# float samples pass through the device loader's normalisation (it normalises uint8 images only)
NO_NORMALISATION = __import__("types").SimpleNamespace(mean=(0.0,), std=(1.0,))


def _draws_of_each_rank(rank, tmp):
    from types import SimpleNamespace

    from sparsebench.runners.pipeline import make_loaders
    from sparsebench.training.resume import LoaderPosition

    data = SimpleNamespace(train=RandomDraws(64), val=RandomDraws(8), test=RandomDraws(8), info=NO_NORMALISATION)
    answer = {}
    for workers in (1, 0):
        torch.manual_seed(0)                            # as every stage seeds each rank alike
        loader = make_loaders(data, batch_size=16, seed=0, workers=workers)["train_dense"]
        batches = [x.tolist() for _ in range(2) for x, _ in loader]     # two epochs
        answer[workers] = {"batches": batches, "global_after": float(torch.rand(()))}
    # a resume replays the epoch's batches: each rank's own stream is back where it was
    position = LoaderPosition(loader)
    for _ in range(5):                                  # one batch into the second epoch
        next(position)
    saved = position.state_dict()
    after = [next(position)[0].tolist() for _ in range(3)]
    again = LoaderPosition(loader)
    again.load_state_dict(saved)
    answer["resumed_alike"] = after == [next(again)[0].tolist() for _ in range(3)]
    return answer


def test_each_rank_draws_its_own_augmentations_from_its_share_of_every_batch(two_ranks):
    ranks = two_ranks["_draws_of_each_rank"]
    for workers in ("0", "1"):
        mine, theirs = ranks[0][workers]["batches"], ranks[1][workers]["batches"]
        assert len(mine) == len(theirs) == 8
        for a, b in zip(mine, theirs):
            assert len(a) == len(b) == 8                                  # half of each global batch of 16
            assert not {row[0] for row in a} & {row[0] for row in b}      # different samples
            for source in (1, 2, 3):                                      # torch, python, numpy draws
                assert [row[source] for row in a] != [row[source] for row in b], (workers, source)
        epoch = [[row[1] for row in batch] for batch in mine]
        assert epoch[:4] != epoch[4:]                                     # a new stream each epoch
    # the augmentations leave the process's own RNG alone: dropout and methods' draws agree on every rank
    assert ranks[0]["0"]["global_after"] == ranks[1]["0"]["global_after"]
    assert ranks[0]["resumed_alike"] and ranks[1]["resumed_alike"]


def _nan_on_rank_one(rank, tmp):
    import time

    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from sparsebench.errors import Diverged
    from sparsebench.training.trainer import Trainer, TrainerHook

    class NanAtStep(TrainerHook):
        def compute_loss(self, trainer, inputs, outputs, targets, loss):
            return loss * float("nan") if rank == 1 and trainer.step == 3 else loss

    torch.manual_seed(0)
    loader = DataLoader(TensorDataset(torch.randn(64, 4), torch.randint(0, 2, (64,))), batch_size=8)
    trainer = Trainer(nn.Linear(4, 2), loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[NanAtStep()])
    start = time.monotonic()
    try:
        trainer.fit(10)
    except Diverged as d:
        return {"ended": "Diverged", "reason": d.reason, "step": trainer.step, "seconds": time.monotonic() - start}
    except Exception as e:  # noqa: BLE001 -- the failure this test exists to show (a collective timed out)
        return {"ended": type(e).__name__, "reason": str(e)[:200], "step": trainer.step,
                "seconds": time.monotonic() - start}
    return {"ended": "finished", "step": trainer.step, "seconds": time.monotonic() - start}


def test_a_nan_on_one_rank_ends_every_rank_as_diverged_at_once(two_ranks):
    ranks = two_ranks["_nan_on_rank_one"]
    assert [r["ended"] for r in ranks] == ["Diverged", "Diverged"], ranks
    assert [r["step"] for r in ranks] == [3, 3]                          # at the same step
    assert "on another rank" in ranks[0]["reason"] and "nan" in ranks[1]["reason"]
    assert max(r["seconds"] for r in ranks) < 5


class CountedSamples(torch.utils.data.Dataset):
    """101 fixed random inputs of 12 classes, remembering which indices it was asked for."""

    def __init__(self):
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(101, 6, generator=g), torch.randint(0, 12, (101,), generator=g)
        self.served = []

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        self.served.append(int(i))
        return self.x[i], self.y[i]


def _evaluate_shards(rank, tmp):
    from types import SimpleNamespace

    from torch import nn
    from torch.utils.data import DataLoader

    from sparsebench.runners.pipeline import make_loaders
    from sparsebench.training.trainer import evaluate

    torch.manual_seed(0)
    model = nn.Linear(6, 12)
    val = CountedSamples()
    loaders = make_loaders(SimpleNamespace(train=CountedSamples(), val=val, test=CountedSamples(), info=NO_NORMALISATION),
                           16, 0)
    shared = evaluate(model, loaders["val"], torch.device("cpu"), 12, per_sample=True)
    served = list(val.served)
    alone = evaluate(model, DataLoader(val, batch_size=7), torch.device("cpu"), 12, per_sample=True)
    return {"served": served, **{name: {"top1": a.top1, "top5": a.top5, "loss": a.loss, "n": a.n,
                                       "correct": a.correct.tolist(), "labels": a.labels.tolist()}
                                for name, a in (("shared", shared), ("alone", alone))}}


def test_validation_is_sharded_over_the_ranks_and_reduced_to_the_one_process_accuracy(two_ranks):
    ranks = two_ranks["_evaluate_shards"]
    served = [set(r["served"]) for r in ranks]
    assert [len(r["served"]) for r in ranks] == [51, 50]                 # each rank about half, once each
    assert not served[0] & served[1] and served[0] | served[1] == set(range(101))
    for r in ranks:
        shared, alone = r["shared"], r["alone"]
        assert shared["n"] == alone["n"] == 101
        assert shared["top1"] == alone["top1"] and shared["top5"] == alone["top5"]
        assert shared["loss"] == pytest.approx(alone["loss"], rel=1e-6)
        assert shared["correct"] == alone["correct"] and shared["labels"] == alone["labels"]   # in split order
    assert 0 < ranks[0]["shared"]["top1"] < 1


def _bad_buffer_on_rank_one(rank, tmp):
    """BN statistics are per rank: a non-finite running variance on rank 1 alone, checked after a stage."""
    from torch import nn

    from sparsebench.errors import Diverged
    from sparsebench.runners.pipeline import _check_finite

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    if rank == 1:
        model[1].running_var[0] = float("inf")
    try:
        _check_finite(model, "finetune")
    except Diverged as d:
        return {"ended": "Diverged", "reason": d.reason}
    return {"ended": "finished"}


def test_non_finite_statistics_on_one_rank_end_every_rank_s_stage(two_ranks):
    ranks = two_ranks["_bad_buffer_on_rank_one"]
    assert [r["ended"] for r in ranks] == ["Diverged", "Diverged"]
    assert "on another rank" in ranks[0]["reason"] and "on another rank" not in ranks[1]["reason"]


# --- S²ViTE's unit choice under DDP --------------------------------------------------------------
def _s2vite_rank(rank, world, tmp, grow):
    """One rank of an S²ViTE run (`grow`): saves its final compacted model's weights."""
    from _pytest.monkeypatch import MonkeyPatch

    from sparsebench.runners import pipeline
    from sparsebench.runners.pipeline import RunOptions, execute

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init-{grow}", rank=rank, world_size=world)
    mp = MonkeyPatch()
    original = pipeline.finetune_stage

    def finetune_stage(spec, outcome, *args, **kwargs):
        torch.save({k: v.detach().clone() for k, v in outcome.model.state_dict().items()},
                   tmp / f"s2vite-{grow}-{rank}.pt")
        return original(spec, outcome, *args, **kwargs)

    mp.setattr(pipeline, "finetune_stage", finetune_stage)
    try:
        spec = tiny_spec("s2vite", model="vit_cifar_tiny", target="flops=0.6", recipe=RECIPE,
                         measure=MeasureSpec(latency=False, threads=1),
                         method_args={"grow": grow, "update_every": 2, "alpha": 0.5})
        execute(spec, RunOptions(out=tmp / f"out-{grow}", checkpoint_every=None))
    finally:
        mp.undo()
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("grow", ["revival", "random"])
def test_s2vite_grows_the_same_units_with_the_same_weights_on_every_rank(tmp_path, grow):
    """Revival scores units on each rank's half of the batch, and both growths put the units' last
    weights back: unless the ranks agree on the scores, each restores weights for its own choice and
    the replicas drift apart for good. The compacted models must be the same on both ranks."""
    os.environ.setdefault("PYTHONPATH", os.getcwd())
    tmp_mp.spawn(_s2vite_rank, args=(2, tmp_path, grow), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"s2vite-{grow}-{r}.pt") for r in range(2))
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-5, worst

"""`sweep --device cuda`: one worker per visible GPU (or `--jobs-per-gpu` per GPU), each pinned to its
own device, on a fake device plan (no GPU needed); the CPU plan is unchanged."""
import collections
import os
import time
from types import SimpleNamespace

import pytest
import torch

from sparsebench.cli import main
from sparsebench.runners import launchers, pool
from sparsebench.runners.pool import PlanError, plan_workers

from conftest import two_run_suite


@pytest.fixture
def four_gpus_sixteen_cores(monkeypatch):
    monkeypatch.setattr(pool.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    monkeypatch.setattr(pool, "_available_memory", lambda: 512 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)


def test_auto_on_cuda_is_one_worker_per_gpu_each_on_its_own(four_gpus_sixteen_cores):
    plan = plan_workers("cuda", None)
    assert plan.jobs == 4 and sorted(plan.devices) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    packed = plan_workers("cuda", None, jobs_per_gpu=2)
    assert packed.jobs == 8 and collections.Counter(packed.devices) == {f"cuda:{k}": 2 for k in range(4)}
    spread = plan_workers("cuda", 6, jobs_per_gpu=2)                  # fewer than the slots: every GPU still used
    assert max(collections.Counter(spread.devices).values()) == 2 and len(set(spread.devices)) == 4
    assert plan_workers("cuda:2", None).devices == ("cuda:2",)       # one named GPU: its own worker
    cpu = plan_workers("cpu", None)
    assert cpu.jobs == 16 and cpu.devices is None                    # the CPU plan is as before
    with pytest.raises(PlanError, match=r"--jobs 16 on --device cuda puts 16 runs on 4 GPU\(s\)"):
        plan_workers("cuda", 16)
    with pytest.raises(PlanError, match="--jobs-per-gpu needs --device cuda"):
        plan_workers("cpu", None, jobs_per_gpu=2)


def _sweep_launches(monkeypatch, tmp_path, *flags):
    """The (jobs, devices) a sweep hands its launcher (the launcher itself replaced: no GPU here)."""
    launched, forked = [], []
    real_forked_here = pool.workers_forked_here

    def forked_here(jobs):
        forked.append(jobs)
        return real_forked_here(jobs)

    def fake_launch(launcher, specs, options, jobs=1, policy="missing", address=None, on_result=None, devices=None):
        launched.append((jobs, devices, options.device))
        return launchers.SweepSummary(launcher)

    monkeypatch.setattr(launchers, "launch", fake_launch)
    monkeypatch.setattr(pool, "workers_forked_here", forked_here)
    suite = tmp_path / "two.yaml"
    suite.write_text(two_run_suite("two", 0.3))
    assert main(["sweep", str(suite), "--out", str(tmp_path / "out"), "--quiet", "--device", "cuda", *flags]) == 0
    # The sweep counted (and may have initialised) CUDA: none of its GPU workers is its own fork.
    assert forked == [1]
    return launched[0]


def test_a_cuda_sweep_gives_each_worker_its_own_gpu(four_gpus_sixteen_cores, monkeypatch, tmp_path, capsys):
    jobs, devices, _ = _sweep_launches(monkeypatch, tmp_path)
    assert jobs == 4 and sorted(devices) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]
    jobs, devices, _ = _sweep_launches(monkeypatch, tmp_path, "--jobs-per-gpu", "2")
    assert jobs == 8 and collections.Counter(devices) == {f"cuda:{k}": 2 for k in range(4)}
    assert "8 workers on 4 GPU(s), each pinned to its own" in capsys.readouterr().out


def test_more_jobs_than_gpus_is_one_line_of_error(four_gpus_sixteen_cores, tmp_path, capsys):
    suite = tmp_path / "two.yaml"
    suite.write_text(two_run_suite("two", 0.3))
    assert main(["sweep", str(suite), "--out", str(tmp_path / "out"), "--device", "cuda", "--jobs", "16"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--jobs 16 on --device cuda" in err[0] and "--jobs-per-gpu" in err[0]


def _device_of_this_worker(_):
    time.sleep(0.2)                  # long enough that every worker takes a task
    return os.getpid(), pool.worker_device()


def test_pool_workers_each_take_one_device():
    devices = ("cuda:0", "cuda:1", "cuda:0", "cuda:1")
    seen = []
    pool.run_pool(_device_of_this_worker, range(12), 4, lambda r: seen.append(r), devices=devices)
    by_worker = collections.defaultdict(set)
    for pid, device in seen:
        by_worker[pid].add(device)
    assert len(seen) == 12 and len(by_worker) >= 2
    assert all(len(d) == 1 for d in by_worker.values())             # a worker keeps its device
    taken = collections.Counter(d for ds in by_worker.values() for (d,) in [tuple(ds)])
    assert taken <= collections.Counter(devices)                    # each slot taken by one worker at most


def test_a_worker_runs_on_its_own_device(monkeypatch):
    """In a pinned worker, the run's options name the worker's GPU (the record's environment says which),
    and that GPU is made the current one."""
    ran, current = [], []
    monkeypatch.setattr(launchers, "run_one", lambda spec, options, policy: ran.append(options.device))
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.append(str(d)))
    monkeypatch.setattr(pool._Worker, "device", "cuda:3")
    launchers._run_payload(({}, launchers.RunOptions(out="x", device="cuda"), "missing"))
    assert ran == ["cuda:3"] and current == ["cuda:3"]


def _record(spec, peak):
    return SimpleNamespace(spec=spec.to_dict(), environment={"device": "cuda:0", "peak_device_memory_bytes": peak})


def test_jobs_per_gpu_is_refused_when_measured_runs_would_not_fit(monkeypatch, capsys):
    from sparsebench.cli.common import CliError
    from sparsebench.cli.runs import CUDA_CONTEXT_BYTES, _check_gpu_packing
    from sparsebench.runners.pipeline import resolve
    from sparsebench.specs import RunSpec, Target

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: SimpleNamespace(total_memory=80 * 10**9))
    spec = resolve(RunSpec(method="magnitude-global", model="resnet20_tiny", dataset="digits",
                           target=Target.parse("sparsity=0.5")))
    plan = pool.WorkerPlan(8, tuple(f"cuda:{k}" for k in range(4) for _ in range(2)))
    _check_gpu_packing([spec], [_record(spec, 30 * 10**9)], plan, 2)          # 2 x 30.5 GB fit 80 GB
    with pytest.raises(CliError, match="at most --jobs-per-gpu 2 fits"):
        _check_gpu_packing([spec], [_record(spec, 30 * 10**9)], plan, 3)
    _check_gpu_packing([spec], [], plan, 3)                                       # nothing measured: said, not refused
    assert "not checked" in capsys.readouterr().out
    assert CUDA_CONTEXT_BYTES > 0

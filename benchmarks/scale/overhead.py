"""Scale-out overheads on this machine (docs/scale.md quotes the figures):

    PYTHONPATH=. python benchmarks/scale/overhead.py launchers   # per-run cost: in-process, pool, Ray
    PYTHONPATH=. python benchmarks/scale/overhead.py ddp         # train-step time: 1 process vs 2 (gloo)

`launchers` runs the same N tiny dense runs (digits, 16 px, 0.3 pretrain epochs, latency off) three
ways and prints wall time per run; the Ray figure excludes `ray.init`, printed apart. `ddp` times
optimizer steps of a model at a global batch of 64: one process, then two gloo processes with 32 each.
"""
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

RUNS = 6


def tiny_specs():
    from sparsebench.runners.pipeline import resolve
    from sparsebench.specs import DataSpec, MeasureSpec, Recipe, RunSpec, Target

    recipe = Recipe(batch_size=64, pretrain_epochs=0.3, finetune_epochs=0.2, search_epochs=0.2)
    return [resolve(RunSpec(method="dense", model="resnet20_tiny", dataset="digits", target=Target.parse("none"),
                            seed=s, recipe=recipe, data=DataSpec(img_size=16),
                            measure=MeasureSpec(latency=False, threads=1))) for s in range(RUNS)]


def launchers():
    from sparsebench.runners.launchers import launch_local, launch_ray
    from sparsebench.runners.pipeline import RunOptions
    import ray

    specs = tiny_specs()
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in [("in-process (local, --jobs 1)", lambda o: launch_local(specs, o, 1)),
                         ("process pool (local, --jobs 2)", lambda o: launch_local(specs, o, 2))]:
            summary = fn(RunOptions(out=Path(tmp) / name[:5], checkpoint_every=None))
            print(f"{name:34} {summary.seconds / RUNS:6.2f} s/run ({summary.line()})", flush=True)
        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})
        print(f"{'ray.init (2 CPUs)':34} {time.perf_counter() - t0:6.2f} s once", flush=True)
        try:
            noop = ray.remote(lambda: None)
            ray.get([noop.remote() for _ in range(4)])
            t0 = time.perf_counter()
            ray.get([noop.remote() for _ in range(200)])
            print(f"{'ray no-op task round trip':34} {(time.perf_counter() - t0) / 200 * 1e3:6.2f} ms/task")
            summary = launch_ray(specs, RunOptions(out=Path(tmp) / "ray", checkpoint_every=None))
            print(f"{'ray (2 CPUs, cold workers)':34} {summary.seconds / RUNS:6.2f} s/run ({summary.line()})")
            summary = launch_ray(specs, RunOptions(out=Path(tmp) / "ray2", checkpoint_every=None))
            print(f"{'ray (2 CPUs, warm workers)':34} {summary.seconds / RUNS:6.2f} s/run ({summary.line()})")
        finally:
            ray.shutdown()


def _steps(model_name, batch, steps, rank=0, world=1, init=None, out=None):
    import torch.distributed as dist
    from sparsebench.models import create_model
    from sparsebench.specs import Recipe
    from sparsebench.training.trainer import Trainer

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, img_size=16)
    x, y = torch.randn(batch, 3, 16, 16), torch.randint(0, 10, (batch,))
    loader = [(x, y)] * 1000
    trainer = Trainer(model, loader, Recipe(batch_size=batch), torch.device("cpu"), 10, 0.05)
    trainer.restart_schedule(steps + 5)
    for _ in range(5):
        trainer.train_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    per_step = (time.perf_counter() - t0) / steps
    if world > 1:
        dist.destroy_process_group()
    if out is not None and rank == 0:
        Path(out).write_text(str(per_step))
    return per_step


def _ddp_rank(rank, model_name, batch, steps, init, out):
    _steps(model_name, batch, steps, rank, 2, init, out)


def ddp(steps=40):
    import torch.multiprocessing as mp

    for model_name in ("resnet20_tiny", "vit_cifar_tiny"):
        one = _steps(model_name, 64, steps)
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "t"
            mp.spawn(_ddp_rank, args=(model_name, 32, steps, Path(tmp) / "init", out), nprocs=2, join=True)
            two = float(out.read_text())
        print(f"{model_name:16} global batch 64: 1 process {one * 1e3:7.1f} ms/step; 2 gloo processes x 32: "
              f"{two * 1e3:7.1f} ms/step ({one / two:.2f}x; ideal 2x; overhead vs half of one: "
              f"{(two - one / 2) * 1e3:+.1f} ms)", flush=True)


if __name__ == "__main__":
    {"launchers": launchers, "ddp": ddp}[sys.argv[1]]()

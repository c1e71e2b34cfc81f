"""`sparsebench sweep SUITE --smoke`: every entry of a suite runs, tiny, before anyone pays for it.

Each distinct (method and arguments, model, dataset, target) of the suite runs once, end to
end through the real pipeline (dense checkpoint, method, fine-tune, evaluation, realization,
measurement, record), for a handful of optimizer steps, on:

- the model's CPU-tiny variant (`resnet50` -> `resnet50_tiny`; every registered model has one;
  the torchvision ResNets' at a quarter of their width), at 16 px, batch 4, fp32 (bf16 autocast is a GPU setting), one torch thread;
- fabricated data in the dataset's real on-disk format (`datasets.replicas`: the same folders,
  file names, pickles and annotation files as the official download, a few images per class;
  `digits` is embedded), read by the dataset's own loader;
- the suite's recipe otherwise (optimizer, learning rates, precision, method-entry values), with
  each phase cut to SMOKE_STEPS steps (a phase the suite leaves at 0 epochs stays at 0), and a
  method whose schedule needs more phases (GaP: rounds x groups) given one step per phase;
- no pretrained weights (the tiny variants have none; `hub` needs the network) and no latency
  timing (the realization itself, with its masked-vs-compacted output check, still runs).

Seeds are one: the others change nothing a smoke run can see. The runs write under a temporary
folder, never into a results store. A suite fails the smoke check on a config error (bad method
argument, recipe value, target kind: the suite does not even load), an unsupported (method,
model) pair (a real sweep would skip it silently), a reference entry missing a field, and any run
that raises or does not end with a result (a missing hook, a shape the exporter cannot handle, a
target the method cannot reach on this model). A missed target is reported but passes: at a
handful of steps some searches cannot settle.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, TextIO

from sparsebench.specs import DataSpec, RunSpec, SpecError

SMOKE_STEPS = 2             # optimizer steps per phase
SMOKE_BATCH = 4
SMOKE_IMG = 16
SMOKE_VAL_FRACTION = 0.25   # of a replica's few images: a validation split that is never empty
PER_CLASS = 8               # training images per class in a fabricated replica
PASSING = ("ok", "missed_target")
# tiny variants that are still millions of weights (torchvision's stage widths): narrowed 4x
SMOKE_MODEL_ARGS = {"resnet18_tiny": {"width": 0.25}, "resnet50_tiny": {"width": 0.25}}


@dataclass
class SmokeResult:
    spec: RunSpec               # the smoke run's spec (tiny model, few steps)
    entry: str                  # the suite setting it stands for: method[args] model dataset target
    status: str                 # the record's status, or "error" when the run raised
    seconds: float
    error: str = ""

    @property
    def passed(self) -> bool:
        return self.status in PASSING


def tiny_model(name: str) -> str:
    """The registered CPU-tiny variant of a model (itself if it is one)."""
    from sparsebench.models import MODELS

    if name.endswith("_tiny"):
        return name
    tiny = f"{name}_tiny"
    if tiny not in MODELS.names():
        raise SpecError(f"model {name!r} has no CPU-tiny variant {tiny!r} for --smoke; allowed: models with one "
                        f"({', '.join(n[:-5] for n in MODELS.names() if n.endswith('_tiny'))})")
    return tiny


def minimum_steps(spec: RunSpec) -> int:
    """Steps the method's schedule needs at least: one per phase of a phased method (GaP's
    rounds x num_groups), else SMOKE_STEPS."""
    from sparsebench.runners.pipeline import resolve

    args = dict(resolve(spec).method_args)
    # GaP's rounds=None is chosen from the budget, at least one round: a smoke run gets one
    phases = int(args.get("rounds") or 1) * int(args.get("num_groups") or 1) if "rounds" in args else 1
    return max(SMOKE_STEPS, phases)


def settings(specs: List[RunSpec]) -> List[RunSpec]:
    """One spec per (method, args, model, dataset, target): the first seed of each."""
    seen, out = set(), []
    for s in specs:
        key = (s.method, s.method_args, s.model, s.dataset, str(s.target), s.recipe, s.data, s.pretrained)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def method_with_args(spec: RunSpec) -> str:
    """The method and every argument the spec sets, `gap-cyclic[num_groups=4,rounds=10]`."""
    args = ",".join(f"{k}={v}" for k, v in spec.method_args)
    return f"{spec.method}{f'[{args}]' if args else ''}"


def entry_label(spec: RunSpec) -> str:
    return f"{method_with_args(spec)} {spec.model} {spec.dataset} {spec.target}"


def smoke_spec(spec: RunSpec, steps_per_epoch: int) -> RunSpec:
    """The tiny, few-step version of a suite run (module docstring)."""
    steps = minimum_steps(spec)
    r = spec.recipe

    def epochs(value: float, wanted: int) -> float:
        return 0.0 if value == 0 else wanted / steps_per_epoch

    recipe = dataclasses.replace(r, batch_size=SMOKE_BATCH, precision="fp32", pretrain_epochs=epochs(r.pretrain_epochs, steps),
                                 finetune_epochs=epochs(r.finetune_epochs, SMOKE_STEPS),
                                 search_epochs=epochs(r.search_epochs, SMOKE_STEPS),
                                 evals_per_epoch=1e-3)   # no validation passes inside the fits
    data = dataclasses.replace(spec.data, img_size=SMOKE_IMG, val_fraction=SMOKE_VAL_FRACTION, workers=0)
    measure = dataclasses.replace(spec.measure, latency=False, threads=1, batch_sizes=(1,), compile=False)
    model = tiny_model(spec.model)
    model_args = {**SMOKE_MODEL_ARGS.get(model, {}), **dict(spec.model_args)}
    return dataclasses.replace(spec, model=model, model_args=tuple(sorted(model_args.items())), recipe=recipe,
                               data=data, measure=measure, pretrained=None)


@contextlib.contextmanager
def partial_data_allowed():
    from sparsebench.datasets._checks import PARTIAL_ENV

    old = os.environ.get(PARTIAL_ENV)
    os.environ[PARTIAL_ENV] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(PARTIAL_ENV, None)
        else:
            os.environ[PARTIAL_ENV] = old


def check_suite(suite) -> None:
    """What fails before any run: an unsupported (method, model) pair. (The CLI checks the
    reference file, which the report layer reads, before it calls `smoke`.)"""
    if suite.skipped:
        method, model, reason = suite.skipped[0]
        raise SpecError(f"suite {suite.name!r}: method {method!r} cannot run on model {model!r} ({reason}); "
                        f"narrow the entry with `models: [...]`" + (f" ({len(suite.skipped)} such pairs)"
                                                                    if len(suite.skipped) > 1 else ""))


def run_smoke(suite, root: Optional[Path] = None, say: Callable[[str], None] = print,
              interval: float = 15.0) -> List[SmokeResult]:
    """Run every setting of `suite` tiny (module docstring); returns one result per setting."""
    import torch

    from sparsebench.datasets import create_dataset
    from sparsebench.datasets.replicas import fabricate
    from sparsebench.runners.pipeline import RunOptions, resolve

    check_suite(suite)
    torch.set_num_threads(1)
    todo = settings(suite.specs)
    results: List[SmokeResult] = []
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sparsebench-smoke-")))
        data_root, out = Path(root) / "data", Path(root) / "out"
        stack.enter_context(partial_data_allowed())
        per_epoch: Dict[str, int] = {}
        for name in sorted({s.dataset for s in todo}):
            fabricate(name, data_root, PER_CLASS)
            data = create_dataset(name, str(data_root), SMOKE_IMG, SMOKE_VAL_FRACTION, 0)
            per_epoch[name] = max(1, math.ceil(data.split["n_train"] / SMOKE_BATCH))
        options = RunOptions(out=out, data_root=str(data_root), resume=False, checkpoint_every=None)
        cache: Dict[tuple, tuple] = {}
        start = last = time.perf_counter()
        for i, spec in enumerate(todo):
            t = time.perf_counter()
            label = entry_label(spec)
            try:
                tiny = resolve(smoke_spec(spec, per_epoch[spec.dataset]))
                record = execute_shared(tiny, options, cache)
                result = SmokeResult(tiny, label, record.status, time.perf_counter() - t, record.error or "")
            except Exception as e:  # noqa: BLE001 -- every failure is reported, the others still run
                message = (str(e).splitlines() or [type(e).__name__])[0]
                result = SmokeResult(spec, label, "error", time.perf_counter() - t, f"{type(e).__name__}: {message}")
            results.append(result)
            if not result.passed:
                say(f"SMOKE FAILED {result.entry}: {result.status}: {result.error}")
            now = time.perf_counter()
            if now - last >= interval and i + 1 < len(todo):
                last = now
                say(f"[smoke {suite.name}] {i + 1}/{len(todo)} settings, {now - start:.0f} s")
    return results


def execute_shared(spec: RunSpec, options, cache: Dict[tuple, tuple]):
    """`pipeline.execute` stage by stage, with the data and the dense stage built once per dense
    checkpoint and shared by the runs that start from it (a smoke run's fixed cost is otherwise
    most of it); the record is built and checked, not written."""
    import torch

    from sparsebench.errors import Diverged
    from sparsebench.runners import pipeline as p
    from sparsebench.specs import stable_hash

    method = p.validate(spec)
    spec = p.resolve(spec)
    device = torch.device(options.device)
    key = (stable_hash(spec.dense_key()), spec.recipe.batch_size, spec.recipe.finetune_epochs,
           spec.recipe.search_epochs)
    if key not in cache:
        data = p.data_stage(spec, options)
        make_model = p.model_factory(spec, data.info, device)
        try:
            dense = p.dense_stage(spec, data, make_model, device, p.cache_dir_of(options))
        except Diverged as d:
            dense = d
        cache[key] = (data, make_model, dense, make_model())
    data, make_model, dense, probe = cache[key]
    p.require_support(spec, method, probe)             # the shared probe: a fresh model per run costs more than the run
    if isinstance(dense, Diverged):
        return p.diverged_dense_record(spec, method, data, dense, device)
    stages = p.train_and_measure(spec, method, data, dense, make_model, device)
    return p.record_stage(spec, method, data, dense, *stages, device)


def summary_line(suite, results: List[SmokeResult], seconds: float) -> str:
    failed = [r for r in results if not r.passed]
    missed = sum(r.status == "missed_target" for r in results)
    return (f"smoke {suite.name}: {len(results)} settings (method, model, dataset, target) in {seconds:.1f} s: "
            f"{len(results) - len(failed)} ran end to end"
            + (f" ({missed} missed their target at {SMOKE_STEPS} steps)" if missed else "")
            + f", {len(failed)} failed")


def smoke(suite, stream: Optional[TextIO] = None) -> int:
    """The CLI's `--smoke`: run, print failures and one summary line; exit code 1 on any failure."""
    stream = stream or sys.stdout
    start = time.perf_counter()

    def say(text: str) -> None:
        print(text, file=stream, flush=True)

    results = run_smoke(suite, say=say)
    say(summary_line(suite, results, time.perf_counter() - start))
    return 1 if any(not r.passed for r in results) else 0


__all__ = ["SMOKE_STEPS", "SmokeResult", "check_suite", "run_smoke", "smoke", "smoke_spec", "tiny_model"]

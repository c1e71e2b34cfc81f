"""run and sweep: one run, or a suite of them, into a results directory."""
from __future__ import annotations

import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Optional

from sparsebench.cli.common import (CliError, _check_device, _check_out_dir, _human, _kv, _progress_factory,
                                    _results_where)


def _spec_from_args(args):

    from sparsebench.specs import DataSpec, MeasureSpec, RunSpec, Target
    from sparsebench.runners.suite import recipe_for
    from sparsebench.methods import METHODS
    from sparsebench.models import model_family

    family = model_family(args.model)
    recipe = recipe_for(family, _kv(args.recipe, "--recipe"), {}, METHODS.get(args.method).factory.default_budget)
    measure = MeasureSpec(latency=not args.no_latency, threads=args.threads,
                          **({"batch_sizes": tuple(args.batch_sizes)} if args.batch_sizes else {}),
                          **_kv(getattr(args, "measure", None), "--measure"))
    return RunSpec(
        method=args.method, model=args.model, dataset=args.dataset, target=Target.parse(args.target),
        seed=args.seed, method_args=tuple(sorted(_kv(args.method_arg, "--method-arg").items())),
        recipe=recipe, data=DataSpec(img_size=args.img_size, val_fraction=args.val_fraction,
                                     **_kv(getattr(args, "data", None), "--data")),
        measure=measure, pretrained="hub" if args.pretrained else args.weights,
    )


def _options(args):
    """Run options, after checking the device and that the output folders can be written."""
    from sparsebench.runners.pipeline import RunOptions

    _check_device(args.device)
    if args.max_bad_samples < 0:
        raise CliError(f"bad --max-bad-samples {args.max_bad_samples}; allowed: an integer >= 0")
    _check_out_dir(Path(args.out), "--out")
    if args.cache_dir:
        _check_out_dir(Path(args.cache_dir), "--cache-dir")
    if args.tracker == "mlflow":
        import importlib.util

        if importlib.util.find_spec("mlflow") is None:
            raise CliError("--tracker mlflow needs mlflow: pip install 'sparsebench[mlflow]'")
    elif args.tracker_uri:
        raise CliError("--tracker-uri is for --tracker mlflow")
    return RunOptions(out=Path(args.out), data_root=args.data_root, download=args.download,
                      cache_dir=Path(args.cache_dir) if args.cache_dir else None, device=args.device,
                      progress=_progress_factory(args.quiet), checkpoint_every=args.checkpoint_every or None,
                      resume=not args.no_resume, max_bad_samples=args.max_bad_samples,
                      save_model=not args.no_save_models, tracker=args.tracker, tracker_uri=args.tracker_uri)


def cmd_run(args) -> int:
    """One run; under `torchrun --nproc_per_node N` every process trains its share of each batch
    (DDP) and rank 0 alone writes the record and prints."""
    from sparsebench.platform import init_distributed
    from sparsebench.runners.pipeline import execute, resolve
    from sparsebench.store import RecordError, RecordStore

    platform = init_distributed(args.device)
    spec = resolve(_spec_from_args(args))
    options = _options(args)
    options.device = str(platform.device(args.device))
    if not platform.is_primary:
        options.progress = None
    elif options.progress is None and not args.quiet:      # no terminal: a plain line every interval
        options.progress_every = args.progress_interval
    say = print if platform.is_primary else (lambda *a, **k: None)
    store = RecordStore(Path(args.out))
    record = None
    if store.exists(spec.run_id) and not args.force:
        try:
            record = store.read(spec.run_id)
            if record.status == "failed":          # a failure is no result: try again
                record = None
            else:
                say(f"already done: {store.path(spec.run_id)}")
        except RecordError as e:     # a damaged record is no finished run: run it again
            say(f"sparsebench: warning: {store.path(spec.run_id)} is unreadable ({e}); re-running",
                file=sys.stderr)
    if platform.broadcast(record is None):          # every rank trains, or none does
        record = execute(spec, options)
        say(f"wrote {store.path(spec.run_id)}")
        if options.tracker == "mlflow" and platform.is_primary:
            _report_to_mlflow(record, options)
    elif record is None:
        record = store.read(spec.run_id)
    platform.barrier()
    if platform.is_primary:
        _print_run_summary(record)
    return 3 if record.status == "diverged" else 0      # the record is kept; scripts still see it failed


def _report_to_mlflow(record, options) -> None:
    """The run's report (its run page, curves and the site around it) as the MLflow run's `report` artifacts
    (the record and model went with the run itself)."""
    import tempfile

    from sparsebench.report.site import build_site
    from sparsebench.training.watch import MlflowTracker

    with tempfile.TemporaryDirectory() as tmp:
        build_site([record], Path(tmp) / "report", svg=False)
        tracker = MlflowTracker(options.out, record.run_id, {}, options.tracker_uri)
        try:
            tracker.artifacts([Path(tmp) / "report"])
        finally:
            tracker.close()


def _print_run_summary(r) -> None:
    head = f"{r.method} {r.model} {r.dataset} {r.target_label} seed {r.seed}"
    if not r.has_result:
        print(f"{head}: {r.status.upper()} ({r.error}); record kept, no metrics")
        return
    from sparsebench.report.leaderboard import entry_label

    best = r.best_latency_entry()
    label = entry_label(best)
    where = r.device if label is None else f"{label}, {r.device}"
    speed = f"{best['measured_speedup']:.2f}× ({where})" if best else r.realization.reason or "–"
    missed = "" if r.target_met else (f"; MISSED TARGET (tolerance -{r.tolerance.below:g}/+{r.tolerance.above:g})")
    print(f"{head}: top1 {100 * r.test_top1:.2f}% (dense {100 * r.dense_test_top1:.2f}%), "
          f"sparsity {r.achieved_sparsity:.4f}, FLOPs ratio {r.achieved_flops_ratio:.4f}, "
          f"theoretical {r.theoretical_speedup:.2f}×, measured {speed}{missed}; mechanism {_verdict(r)}")


def _verdict(r) -> str:
    """The record's mechanism verdict; a seed method that did not act is in capitals, as a missed target."""
    if r.mechanism is None:
        return "not recorded"
    text = r.mechanism.verdict
    return f"DID NOT ACT{text[len('did not act'):]}" if text.startswith("did not act") else text


def _flagged(r) -> str:
    """Why a finished run's number is not the method's own: its mechanism did not act, or it missed its
    target; "" for a run that is what it says."""
    if r is None or not r.has_result:
        return ""
    parts = [] if r.mechanism_acted else [r.mechanism.reason]
    if not r.target_met:
        parts.append(f"missed target ({r.target_label}: sparsity {r.achieved_sparsity:.4f}, "
                     f"FLOPs ratio {r.achieved_flops_ratio:.4f})")
    return "; ".join(parts)


# --- sweep ----------------------------------------------------------------------------------
def cmd_sweep(args) -> int:
    """The sweep; SIGINT or SIGTERM at any moment ends it with one line and exit 128 + the signal."""
    from sparsebench.runners.pool import Stopped, stop_on_signals

    try:
        with stop_on_signals():
            return _sweep(args)
    except Stopped as e:
        print(f"sparsebench: sweep interrupted by {e.name}; finished runs are saved, re-run the same command "
              "to resume", file=sys.stderr)
        return e.exit_code


def _sweep(args) -> int:
    """The local pool's workers are forked first, from the sweep itself, once the harness is imported
    and before anything is planned or run (`pool.workers_forked_here`): they share the imports' memory."""
    import sparsebench.runners.launchers  # noqa: F401  (torch, timm, the harness: what a worker runs)
    from sparsebench.runners.pool import workers_forked_here

    plan = _worker_plan(args)
    # Workers pinned to GPUs come from the fork server (`pool.run_pool`), never forked from the sweep.
    local_pool = args.launcher == "local" and not (args.smoke or args.dry_run or args.rehearse) and plan.devices is None
    with workers_forked_here(plan.jobs if local_pool else 1):
        return _plan_and_run(args, plan)


def _worker_plan(args):
    """How many workers the sweep runs, and on CUDA which GPU each one uses (`pool.plan_workers`)."""
    from sparsebench.runners.pool import PlanError, WorkerPlan, auto_jobs, plan_workers

    if args.smoke or args.dry_run or args.rehearse:         # nothing runs in workers
        return WorkerPlan(args.jobs or 1)
    if args.launcher == "ray":             # Ray gives each CUDA run a GPU of its own (`launchers.resources`)
        if args.jobs_per_gpu is not None:
            raise CliError("--jobs-per-gpu is for the local launcher; Ray gives each run on CUDA a GPU of its own")
        return WorkerPlan(auto_jobs() if args.jobs is None else args.jobs)
    _check_device(args.device)
    try:
        return plan_workers(args.device, args.jobs, args.jobs_per_gpu)
    except PlanError as e:
        raise CliError(str(e)) from None


def _plan_and_run(args, plan) -> int:
    from sparsebench.runners.launchers import launch, wants_run
    from sparsebench.runners.pipeline import resolve
    from sparsebench.runners.pool import Stopped
    from sparsebench.runners.progress import SweepEta
    from sparsebench.runners.suite import load_suite
    from sparsebench.specs import RunSpec, stable_hash
    from sparsebench.store import load_records
    from sparsebench.store.records import RecordStore

    suite = load_suite(Path(args.suite))
    if args.smoke:                 # every setting, tiny, on fabricated data (runners/smoke.py)
        from sparsebench.report.references import load_references
        from sparsebench.runners.smoke import smoke

        load_references()          # a reference entry missing a field fails here, in one line
        return smoke(suite)
    if args.rehearse:              # every setting at full size, measured, on fabricated data (runners/rehearse.py)
        from sparsebench.runners.rehearse import rehearse

        if args.device_batch is not None and args.device_batch < 1:
            raise CliError(f"--device-batch={args.device_batch}; allowed: a positive number of images")
        return rehearse(suite, Path(args.out), args.device, args.device_batch, args.rehearse_cover)
    specs = [resolve(s) for s in suite.specs]
    if args.dry_run:
        return _dry_run(suite, specs, args)
    if plan.jobs < 1:
        raise CliError(f"bad --jobs {plan.jobs}; allowed: auto or an integer >= 1")
    if args.address and args.launcher != "ray":
        raise CliError("--address needs --launcher ray")
    if args.retry_failed and args.rerun:
        raise CliError("--retry-failed and --rerun exclude each other (--rerun already redoes every run)")
    if args.launcher == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            raise CliError("--launcher ray needs Ray: pip install 'ray>=2'") from None
    if args.lock_timeout <= 0:
        raise CliError(f"bad --lock-timeout {args.lock_timeout:g}; allowed: seconds > 0")
    options = dataclasses.replace(_options(args), lock_timeout=args.lock_timeout)
    out = Path(args.out)
    reference = _reference_records(args.compare, out)
    store = RecordStore(out)
    if args.shard:
        specs = _shard(specs, args.shard)
    policy = "all" if args.rerun else "failed" if args.retry_failed else "missing"
    done = [s for s in specs if store.exists(s.run_id)]
    todo = [s for s in specs if wants_run(store, s.run_id, policy)]
    print(f"suite {suite.name}: {len(specs)} runs, {len(done)} already done, {len(todo)} to run"
          + (" (--rerun: finished runs are redone)" if args.rerun and done else "")
          + (" (--retry-failed: only failed runs)" if args.retry_failed else "")
          + (f"; skipped {len(suite.skipped)} unsupported (method, model) pairs" if suite.skipped else ""))
    if plan.devices:
        print(f"{plan.jobs} workers on {len(set(plan.devices))} GPU(s), each pinned to its own: "
              + ", ".join(plan.devices))
    if args.jobs_per_gpu and args.jobs_per_gpu > 1 and plan.devices:
        _check_gpu_packing(todo, store.load_all() + (reference or []), plan, args.jobs_per_gpu)
    _check_data(todo, options)
    eta = SweepEta.plan(todo, reference=reference or [], assume_tflops=args.assume_tflops,
                        done_dense={stable_hash(s.dense_key()) for s in done}, workers=plan.jobs)
    if todo:
        print(f"estimated {_human(eta.total())} from "
              + ("the reference records' measured step costs" if reference else "FLOPs at --assume-tflops")
              + "; refined from each finished run")
    bar = _sweep_progress(args, len(todo), suite.name, eta)
    by_id = {s.run_id: s for s in todo}

    def finished(result):
        s = by_id[RunSpec.from_dict(result.spec).run_id]
        record = None
        if result.status == "done":
            with contextlib.suppress(Exception):
                record = store.read(s.run_id)
        eta.finish(s, result.seconds, record, result.phases)
        bar.update(f"{s.method} {s.model} {s.target}", _flagged(record))

    try:
        summary = launch(args.launcher, todo, options, plan.jobs, policy, args.address, finished, plan.devices)
    except Stopped as e:
        bar.close()
        print(_stopped_line(e, len(todo)), file=sys.stderr)
        return e.exit_code
    bar.close()
    from sparsebench.report import write_reports

    reports = write_reports(out, title=f"Leaderboard: {suite.name} suite")
    print(reports["text"])
    if reference is not None:
        from sparsebench.report.compare import compare_text

        print(compare_text(load_records(out), reference, args.compare))
    print(f"sweep wall time {summary.seconds:.1f} s for {len(todo)} runs; " + _models_note(store, specs, options))
    print(summary.line() + ("; `--retry-failed` runs the failed ones again" if summary.failed else ""))
    skipped = summary.skip_line(len(specs) - len(todo), len(suite.skipped))
    if skipped:
        print(skipped)
    for line in _flagged_lines(store, specs) + _results_where(out, reports["files"]):
        print(line)
    for result in summary.failures:
        spec_dict, t = result.spec, result.spec["target"]
        target = "none" if t["kind"] == "none" else f"{t['kind']}={t['value']:g}"
        print(f"FAILED {spec_dict['method']} {spec_dict['model']} {spec_dict['dataset']} {target} "
              f"seed {spec_dict['seed']}: {result.error}", file=sys.stderr)
    return 1 if summary.failures else 0


def _flagged_lines(store, specs):
    """The suite's recorded runs whose number is not their method's own, one line per kind: "2 did not
    act: ofb vit_cifar_tiny flops=0.5 (eliminated_fraction = 0 ...), ...; listed apart"."""
    from sparsebench.methods.base import method_label

    not_acted, missed = [], []
    for s in specs:
        if not store.exists(s.run_id):
            continue
        try:
            r = store.read(s.run_id)
        except Exception:   # noqa: BLE001 -- a damaged record was warned about where it was read
            continue
        if not r.has_result:
            continue
        name = f"{method_label(s.method, dict(s.method_args))} {s.model} {s.target}"
        if not r.mechanism_acted:
            not_acted.append(f"{name} ({r.mechanism.reason.removeprefix('did not act: ')})")
        if not r.target_met:
            missed.append(f"{name} (sparsity {r.achieved_sparsity:.4f}, FLOPs ratio {r.achieved_flops_ratio:.4f})")
    lines = []
    if not_acted:
        lines.append(f"{len(not_acted)} did not act: {', '.join(not_acted)}; listed apart, never ranked as the method")
    if missed:
        lines.append(f"{len(missed)} missed their target: {', '.join(missed)}; listed apart")
    return lines


CUDA_CONTEXT_BYTES = 2**29       # what each worker's CUDA context takes besides its tensors (about 0.5 GB)


def _check_gpu_packing(todo, records, plan, per_gpu: int) -> None:
    """`--jobs-per-gpu N`: N of the largest run to come, as finished records of the same model, data,
    image size and batch measured it (`peak_device_memory_bytes`), must fit the smallest GPU in use,
    else one line with the N that fits. Runs nothing measured yet are left to the user (said once)."""
    import torch

    def key(spec):
        return spec.model, spec.dataset, spec.data.img_size, spec.recipe.batch_size

    from sparsebench.specs import RunSpec

    peaks = {}
    for r in records:
        peak = (r.environment or {}).get("peak_device_memory_bytes")
        if peak:
            with contextlib.suppress(Exception):      # a record of an older spec format: not a measure here
                k = key(RunSpec.from_dict(r.spec))
                peaks[k] = max(peaks.get(k, 0), int(peak))
    measured = {key(s): peaks[key(s)] for s in todo if key(s) in peaks}
    unmeasured = len({key(s) for s in todo} - set(measured))
    if unmeasured:
        print(f"note: --jobs-per-gpu {per_gpu} is not checked for {unmeasured} (model, data, image size, batch) "
              "setting(s) no finished run here measured on CUDA; a run that runs out of GPU memory is recorded failed")
    if not measured:
        return
    (model, dataset, img_size, batch), peak = max(measured.items(), key=lambda kv: kv[1])
    memory = min(torch.cuda.get_device_properties(torch.device(d)).total_memory for d in set(plan.devices))
    need = per_gpu * (peak + CUDA_CONTEXT_BYTES)
    if need > memory:
        fits = memory // (peak + CUDA_CONTEXT_BYTES)
        raise CliError(f"--jobs-per-gpu {per_gpu}: {model} on {dataset} at {img_size} px, batch {batch} peaked at "
                       f"{peak / 1e9:.1f} GB of GPU memory in a finished run; {per_gpu} of them need "
                       f"{need / 1e9:.1f} GB with their CUDA contexts, a GPU here has {memory / 1e9:.1f} GB: "
                       + (f"at most --jobs-per-gpu {fits} fits" if fits >= 1 else "not even one fits"))


def _models_note(store, specs, options) -> str:
    """How many of the suite's runs have a saved model, and their size on disk."""
    if not options.save_model:
        return "models not saved (--no-save-models)"
    sizes = []
    for s in specs:
        with contextlib.suppress(Exception):
            artifact = store.read(s.run_id).artifact
            if artifact and artifact.get("path"):
                sizes.append(artifact["bytes"])
    return (f"{len(sizes)} of {len(specs)} runs' models saved under {store.root / 'models'}, "
            f"{sum(sizes) / 1e6:.1f} MB ({max(sizes, default=0) / 1e6:.2f} MB the largest); --no-save-models skips them")


def _stopped_line(stop, total: int) -> str:
    s = stop.summary
    counted = (s.done, s.failed, s.skipped, s.blocked) if s is not None else (0, 0, 0, 0)
    return (f"sparsebench: sweep interrupted by {stop.name}"
            + (f" after {s.seconds:.1f} s" if s is not None else "")
            + f": {counted[0]} done, {counted[1]} failed, {counted[2]} skipped, {total - sum(counted)} unfinished; "
            "finished runs are saved, re-run the same command to resume")


def _reference_records(compare: Optional[str], out: Path):
    """The records of `--compare DIR`, or None; DIR must not be the output directory itself."""
    if not compare:
        return None
    from sparsebench.store import load_records

    if Path(compare).resolve() == out.resolve():
        raise CliError(f"--compare {compare!r} is the output directory; compare against another results directory")
    return load_records(Path(compare))


class _Bar:
    """tqdm on a terminal, showing the phase-cost ETA instead of tqdm's run-rate guess."""

    def __init__(self, total: int, name: str, eta):
        from tqdm.auto import tqdm

        self.eta = eta
        self.bar = tqdm(total=total, desc=f"sweep {name}", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.bar.set_postfix_str(f"ETA {_human(eta.remaining())}")

    def update(self, what: str, note: str = "") -> None:
        if note:                  # a run whose number is not the method's own gets a line above the bar
            self.bar.write(f"{what}: {note}")
        self.bar.set_postfix_str(f"ETA {_human(self.eta.remaining())}, last {what}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _Silent:
    def update(self, what: str, note: str = "") -> None:
        pass

    def close(self) -> None:
        pass


def _sweep_progress(args, total: int, name: str, eta):
    from sparsebench.runners.progress import PlainProgress

    if args.quiet or not total:
        return _Silent()
    if sys.stderr.isatty():
        return _Bar(total, name, eta)
    from sparsebench.runners.pipeline import progress_dir

    return PlainProgress(total, name, eta, interval=args.progress_interval, running=progress_dir(Path(args.out)))


def _check_data(specs, options) -> None:
    """Load every dataset the runs need once, and check its image files (metadata and a decoded
    sample; the verdict cached in the data folder for the runs and later sweeps), so missing or
    undecodable data is one error before any run, not one per run."""
    from sparsebench.datasets import create_dataset
    from sparsebench.datasets.integrity import screen

    for dataset in sorted({s.dataset for s in specs}):      # the files do not depend on the image size
        data = create_dataset(dataset, options.data_root, None, download=options.download)
        screen(data, options.max_bad_samples, options.progress)


def _shard(specs, text: str):
    """`i/n`: this machine's share of the runs, chosen by spec hash, so n machines writing into
    one results directory split a suite without overlap."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise CliError(f"bad --shard {text!r}; expected i/n with 0 <= i < n")
    return [s for s in specs if int(s.hash[:8], 16) % int(count) == int(index)]


def _dry_run(suite, specs, args) -> int:
    """Every run's steps and predicted time, then device-hours per method and per (method, model):
    one estimate, the sweep ETA's (measured step costs from `--compare DIR` and OUT's records where
    they exist, else MACs at `--assume-tflops`; `runners/cost.py`)."""
    from sparsebench.runners.cost import cost_report, suite_cost
    from sparsebench.store import load_records

    measured = (_reference_records(args.compare, Path(args.out)) or []) + \
        (load_records(Path(args.out)) if Path(args.out).is_dir() else [])
    cost = suite_cost(suite.name, specs, measured, args.assume_tflops)
    print(f"suite {suite.name}: {len(specs)} runs (estimates assume {args.assume_tflops:g} TFLOP/s sustained "
          "training throughput where no step cost was measured)")
    for method, model, reason in suite.skipped:
        print(f"skipped: {method} × {model} ({reason})")
    print(cost_report(cost))
    return 0

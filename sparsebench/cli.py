"""The `sparsebench` command line.

    sparsebench run --method gmp --model resnet20_tiny --dataset digits --target sparsity=0.9 --seed 0 --out DIR
    sparsebench sweep benchmarks/quick.yaml --out DIR [--jobs N] [--launcher local|ray [--address A]]
                      [--retry-failed] [--dry-run] [--lock-timeout SECONDS]
    sparsebench leaderboard DIR          sparsebench plot DIR          sparsebench report DIR --out SITE
    sparsebench compare DIR A B [--target sparsity=0.9] [--model M] [--format text|json]
    sparsebench list [methods|models|datasets]
    sparsebench check-data DATASET [--data-root DIR] [--img-size N]
    sparsebench flops MODEL [--img-size N] [--json] [--cross-check]
    sparsebench speedup [--models ...] [--flops 0.75 0.5 0.25] [--out results/speedup/cpu]

Bad input ends with one line on stderr naming the bad value and what is allowed, exit
code 2, and nothing written to the results store.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

ERROR_EXIT = 2


class CliError(Exception):
    pass


def _kv(items: Optional[List[str]], flag: str) -> dict:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"bad {flag} {item!r}; expected name=value")
        out[key.strip()] = _yaml_scalar(value)
    return out


def _yaml_scalar(text: str):
    import yaml

    try:
        return yaml.safe_load(text) if text.strip() else text
    except yaml.YAMLError:
        return text


def _progress_factory(quiet: bool):
    if quiet or not sys.stderr.isatty():     # logs and CI get the sweep's plain lines instead
        return None
    from tqdm.auto import tqdm

    def factory(total: int, desc: str):
        return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)

    return factory


# --- run ------------------------------------------------------------------------------------
def _spec_from_args(args):

    from sparsebench.specs import DataSpec, MeasureSpec, RunSpec, Target
    from sparsebench.runners.suite import recipe_for
    from sparsebench.models import model_family

    family = model_family(args.model)
    recipe = recipe_for(family, _kv(args.recipe, "--recipe"), {})
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
    return RunOptions(out=Path(args.out), data_root=args.data_root, download=args.download,
                      cache_dir=Path(args.cache_dir) if args.cache_dir else None, device=args.device,
                      progress=_progress_factory(args.quiet), checkpoint_every=args.checkpoint_every or None,
                      resume=not args.no_resume, max_bad_samples=args.max_bad_samples)


def _check_device(text: str) -> None:
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise CliError(f"bad --device {text!r}; allowed: cpu, cuda, cuda:N") from None
    if device.type == "cpu":
        return
    if device.type != "cuda":
        raise CliError(f"bad --device {text!r}; allowed: cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise CliError(f"--device {text!r} is not available here (no CUDA GPU); allowed: cpu")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {text!r} is not available here; allowed: cpu, cuda:0 to "
                       f"cuda:{torch.cuda.device_count() - 1}")


# The longest name written under an output folder: a record, a checkpoint or a temp file of either.
LONGEST_NAME = 255
SUBFOLDERS = ("records", "checkpoints", "data-checks", "partial")


def _check_out_dir(path: Path, flag: str) -> None:
    """An output folder that can be created and written, with room for every file name the run
    writes inside PATH_MAX: else one line now, not a lost run at the last step."""
    import errno
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise CliError(f"{flag} {_short(path)} is too long: a name in it exceeds the file system's limit "
                           f"({_limit(path, 'PC_NAME_MAX', 255)} bytes per name, {_limit(path, 'PC_PATH_MAX', 4096)} per path)") from None
        raise CliError(f"{flag} {_short(path)} cannot be created or written: {e.strerror}") from None
    path_max = _limit(path, "PC_PATH_MAX", 4096)          # counts the terminating NUL
    length = len(os.fsencode(path.resolve()))
    room = 1 + max(map(len, SUBFOLDERS)) + 1 + LONGEST_NAME
    if length + room >= path_max:
        raise CliError(f"{flag} {_short(path)} is too long ({length} bytes as an absolute path); records and "
                       f"checkpoints inside it could exceed PATH_MAX; allowed: at most {path_max - 1 - room} bytes")


def _limit(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path if path.exists() else "/", name)
    except (OSError, ValueError):
        return default


def _short(path: Path) -> str:
    text = str(path)
    return repr(text if len(text) <= 80 else text[:38] + "..." + text[-38:])


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
    elif record is None:
        record = store.read(spec.run_id)
    platform.barrier()
    if platform.is_primary:
        _print_run_summary(record)
    return 3 if record.status == "diverged" else 0      # the record is kept; scripts still see it failed


def _print_run_summary(r) -> None:
    head = f"{r.method} {r.model} {r.dataset} {r.target_label} seed {r.seed}"
    if not r.has_result:
        print(f"{head}: {r.status.upper()} ({r.error}); record kept, no metrics")
        return
    speed = f"{r.measured_speedup:.2f}× ({r.device})" if r.measured_speedup else r.realization.reason or "–"
    missed = "" if r.target_met else (f"; MISSED TARGET (tolerance -{r.tolerance.below:g}/+{r.tolerance.above:g})")
    print(f"{head}: top1 {100 * r.test_top1:.2f}% (dense {100 * r.dense_test_top1:.2f}%), "
          f"sparsity {r.achieved_sparsity:.4f}, FLOPs ratio {r.achieved_flops_ratio:.4f}, "
          f"theoretical {r.theoretical_speedup:.2f}×, measured {speed}{missed}")


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
    specs = [resolve(s) for s in suite.specs]
    if args.dry_run:
        return _dry_run(suite, specs, args)
    if args.jobs < 1:
        raise CliError(f"bad --jobs {args.jobs}; allowed: an integer >= 1")
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
    _check_data(todo, options)
    eta = SweepEta.plan(todo, reference=reference or [], assume_tflops=args.assume_tflops,
                        done_dense={stable_hash(s.dense_key()) for s in done})
    if todo:
        print(f"estimated {_human(eta.total())} from "
              + ("the reference records' measured step costs" if reference else "FLOPs at --assume-tflops")
              + "; refined from each finished run")
    bar = _sweep_progress(args, len(todo), suite.name, eta)
    by_id = {s.run_id: s for s in todo}
    last = [time.perf_counter()]
    parallel = args.jobs > 1 or args.launcher == "ray"

    def finished(result):
        s = by_id[RunSpec.from_dict(result.spec).run_id]
        now = time.perf_counter()
        # runs overlap: the time between completions times the workers is one run's cost
        wall = (now - last[0]) * args.jobs if parallel else result.seconds
        last[0] = now
        record = None
        if result.status == "done":
            with contextlib.suppress(Exception):
                record = store.read(s.run_id)
        eta.finish(s, wall, record)
        bar.update(f"{s.method} {s.model} {s.target}")

    try:
        summary = launch(args.launcher, todo, options, args.jobs, policy, args.address, finished)
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
    print(_wrote(reports["files"], out))
    print(f"open {reports['site'] / 'index.html'} in a browser for the sortable report")
    print(f"sweep wall time {summary.seconds:.1f} s for {len(todo)} runs")
    print(summary.line() + ("; `--retry-failed` runs the failed ones again" if summary.failed else ""))
    for result in summary.failures:
        spec_dict, t = result.spec, result.spec["target"]
        target = "none" if t["kind"] == "none" else f"{t['kind']}={t['value']:g}"
        print(f"FAILED {spec_dict['method']} {spec_dict['model']} {spec_dict['dataset']} {target} "
              f"seed {spec_dict['seed']}: {result.error}", file=sys.stderr)
    return 1 if summary.failures else 0


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


def _human(seconds: float) -> str:
    from sparsebench.runners.suite import human_seconds

    return human_seconds(seconds)


class _Bar:
    """tqdm on a terminal, showing the phase-cost ETA instead of tqdm's run-rate guess."""

    def __init__(self, total: int, name: str, eta):
        from tqdm.auto import tqdm

        self.eta = eta
        self.bar = tqdm(total=total, desc=f"sweep {name}", dynamic_ncols=True,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        self.bar.set_postfix_str(f"ETA {_human(eta.remaining())}")

    def update(self, what: str) -> None:
        self.bar.set_postfix_str(f"ETA {_human(self.eta.remaining())}, last {what}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _Silent:
    def update(self, what: str) -> None:
        pass

    def close(self) -> None:
        pass


def _sweep_progress(args, total: int, name: str, eta):
    from sparsebench.runners.progress import PlainProgress

    if args.quiet or not total:
        return _Silent()
    if sys.stderr.isatty():
        return _Bar(total, name, eta)
    return PlainProgress(total, name, eta, interval=args.progress_interval)


def _check_data(specs, options) -> None:
    """Load every dataset the runs need once, and decode its image files (cached for the runs),
    so missing or undecodable data is one error before any run, not one per run."""
    from sparsebench.datasets import create_dataset
    from sparsebench.datasets.integrity import screen

    for dataset, img_size in sorted({(s.dataset, s.data.img_size) for s in specs}, key=str):
        data = create_dataset(dataset, options.data_root, img_size, download=options.download)
        screen(data, options.max_bad_samples, options.progress, Path(options.out) / "data-checks")


def cmd_check_data(args) -> int:
    """Decode every image file of a dataset (train and test), with a progress bar; list the bad ones."""
    from sparsebench.datasets import create_dataset
    from sparsebench.datasets.integrity import scan

    data = create_dataset(args.dataset, args.data_root, args.img_size, download=False)
    checked, bad = scan(data, _progress_factory(args.quiet), name=args.dataset)
    if not checked:
        print(f"{args.dataset}: held in memory, no image files to decode; nothing to check")
        return 0
    for b in bad:
        print(f"bad {b.path}: {b.error}")
    print(f"{args.dataset}: {checked} image files decoded, {len(bad)} bad"
          + ("" if not bad else "; replace them, or run with --max-bad-samples N to skip and count them"))
    return 1 if bad else 0


def _shard(specs, text: str):
    """`i/n`: this machine's share of the runs, chosen by spec hash, so n machines writing into
    one results directory split a suite without overlap."""
    index, sep, count = text.partition("/")
    if not (sep and index.isdigit() and count.isdigit() and 0 <= int(index) < int(count)):
        raise CliError(f"bad --shard {text!r}; expected i/n with 0 <= i < n")
    return [s for s in specs if int(s.hash[:8], 16) % int(count) == int(index)]


def _dry_run(suite, specs, args) -> int:
    from sparsebench.runners.suite import count_dense_checkpoints, estimate_cost, human_seconds, steps_of_run
    from sparsebench.methods import create_method

    total_seconds = 0.0
    cache = {}
    print(f"suite {suite.name}: {len(specs)} runs, {count_dense_checkpoints(specs)} dense checkpoints "
          f"(time assumes {args.assume_tflops:g} TFLOP/s sustained training throughput)")
    print(f"{'run':<72} {'steps':>8} {'est.':>8}")
    dense_seen = set()
    summary = {}
    for s in specs:
        key = (s.model, s.dataset, s.data.img_size, s.recipe.batch_size)
        if key not in cache:
            cache[key] = estimate_cost(s, args.assume_tflops)
        cost = cache[key]
        method = create_method(s.method, **dict(s.method_args))
        steps = steps_of_run(s, cost, method.starts_from, method.granularity != "none")
        dense_key = json.dumps(s.dense_key(), sort_keys=True)
        if dense_key not in dense_seen:
            dense_seen.add(dense_key)
            steps += cost["steps"]["pretrain"]
        seconds = steps * cost["seconds_per_step"]
        total_seconds += seconds
        print(f"{s.run_id[:72]:<72} {steps:>8} {human_seconds(seconds):>8}")
        per_pair = summary.setdefault((s.method + _args_label(s), s.model), [0, 0, 0.0])
        per_pair[0] += 1
        per_pair[1] += steps
        per_pair[2] += seconds
    for method, model, reason in suite.skipped:
        print(f"skipped: {method} × {model} ({reason})")
    print()
    print(f"{'method':<44} {'model':<22} {'runs':>5} {'steps':>9} {'est.':>8}")
    for (method, model), (runs, steps, seconds) in sorted(summary.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        print(f"{method[:44]:<44} {model[:22]:<22} {runs:>5} {steps:>9} {human_seconds(seconds):>8}")
    print(f"total: {len(specs)} runs, {count_dense_checkpoints(specs)} dense checkpoints, "
          f"{human_seconds(total_seconds)} estimated (dense pretraining counted in the first run of each checkpoint)")
    from sparsebench.runners.cost import cost_report, suite_cost
    from sparsebench.store import load_records

    # device-hours per method and suite: measured step costs from --compare DIR and OUT's records where they exist
    measured = (_reference_records(args.compare, Path(args.out)) or []) + \
        (load_records(Path(args.out)) if Path(args.out).is_dir() else [])
    print(cost_report(suite_cost(suite.name, specs, measured, args.assume_tflops)))
    return 0


def _args_label(spec) -> str:
    """The method arguments a suite set (not the defaults `resolve` filled in), for the summary."""
    from sparsebench.methods.base import METHODS, build_config, config_dict

    try:
        defaults = config_dict(build_config(METHODS.get(spec.method).factory, {}))
    except Exception:          # noqa: BLE001 — an unknown default: show every argument
        defaults = {}
    changed = [f"{k}={v}" for k, v in spec.method_args if defaults.get(k, object()) != v]
    return f"[{','.join(changed)}]" if changed else ""


# --- reports, listing, flops ------------------------------------------------------------------
def _wrote(files, root: Path) -> str:
    """`wrote ...` naming every file, grouped by folder so a site's pages stay readable."""
    groups = {}
    for f in files:
        f = Path(f)
        groups.setdefault(str(f.parent), []).append(f.name)
    parts = [f"{folder}/: {', '.join(names)}" for folder, names in groups.items()]
    return f"wrote {len(files)} files: " + "; ".join(parts)


def cmd_report(args) -> int:
    from sparsebench.report.site import build_site

    records = _readable_records(args.dir)
    out = Path(args.out) if args.out else Path(args.dir) / "report"
    files = build_site(records, out, title=args.title or f"sparsebench leaderboard: {Path(args.dir).name}")
    print(_wrote(files, out))
    print(f"open {out / 'index.html'} in a browser (no server needed)")
    return 0


def _readable_records(directory: str):
    """The records of a results directory, or a one-line error when it holds none that read."""
    from sparsebench.store import load_records

    records = load_records(Path(directory))
    if not records:
        raise CliError(f"no readable run records in {directory!r} (expected JSON records under "
                       f"{str(Path(directory) / 'records')!r})")
    return records


def cmd_leaderboard(args) -> int:
    from sparsebench.report import Leaderboard, display_table, to_markdown

    board = Leaderboard.of(_readable_records(args.dir))
    agg = board.table
    if args.format == "csv":
        text = agg.to_csv(index=False)
    elif args.format == "html":
        text = display_table(agg).to_html(index=False)
    else:
        text = to_markdown(agg, left_out=board.excluded)
    if args.output:
        from sparsebench.store.records import atomic_write_text

        atomic_write_text(Path(args.output), text)
        print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def cmd_compare(args) -> int:
    """Two methods of one results directory, paired by seed at every setting both ran."""
    from sparsebench.report.compare import CompareError, compare_methods, compare_methods_text

    records = _readable_records(args.dir)
    try:
        rows = compare_methods(records, args.a, args.b, target=args.target, model=args.model)
    except CompareError as e:
        raise CliError(str(e)) from None
    print(json.dumps(rows, indent=2) if args.format == "json" else compare_methods_text(rows))
    return 0


def cmd_plot(args) -> int:
    from sparsebench.report import Leaderboard
    from sparsebench.report.plots import plot

    agg = Leaderboard.of(_readable_records(args.dir)).table
    if agg.empty:
        raise CliError(f"no records with status ok in {args.dir!r}")
    name = "accuracy_vs_flops.png" if args.x == "macs" else "accuracy_vs_speedup.png"
    path = plot(agg, Path(args.output) if args.output else Path(args.dir) / name, x=args.x)
    print(f"wrote {path}")
    return 0


def cmd_list(args) -> int:
    from sparsebench.datasets import DATASETS
    from sparsebench.methods import METHODS
    from sparsebench.models import MODELS

    kinds = {"methods": METHODS, "models": MODELS, "datasets": DATASETS}
    for kind in [args.what] if args.what else list(kinds):
        print(f"{kind}:")
        for entry in kinds[kind]:
            extra = ""
            if kind == "methods":
                cls = entry.factory
                starts = cls.starts_from if isinstance(cls.starts_from, str) else "pretrained|scratch"
                extra = f" [{cls.granularity}, from {starts}]"
            elif kind == "models":
                extra = f" [{entry.tags[0]}]"
            print(f"  {entry.name:<22} {entry.description}{extra}")
    return 0


def cmd_flops(args) -> int:
    from sparsebench.measure.flops import count_macs, count_params

    model = _any_model(args.model, args.num_classes, args.img_size)
    report = count_macs(model, (3, args.img_size, args.img_size), fused_attention=args.fused_attention)
    params = count_params(model)
    data = {"model": args.model, **report.as_dict(), **params,
            "layers": {k: v.macs for k, v in report.layers.items()} if args.layers else None}
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(f"{args.model} at {args.img_size}px: {report.macs / 1e9:.4f} GMACs ({report.flops / 1e9:.4f} GFLOPs), "
              f"attention matmuls {report.attention_macs / 1e9:.4f} GMACs, params {params['params'] / 1e6:.3f} M")
    if args.cross_check:
        from sparsebench.measure.flops import fvcore_macs

        if args.fused_attention:
            raise CliError("--cross-check counts with fused attention off; drop --fused-attention")
        theirs = fvcore_macs(model, (3, args.img_size, args.img_size))
        print("conv + linear + matmul MACs per image, fused attention off:")
        print(f"  sparsebench {report.macs:>15,d} MACs")
        print(f"  fvcore      {theirs:>15,d} MACs")
        print(f"  difference {report.macs - theirs:,d} MACs ({(report.macs - theirs) / max(1, theirs):+.4%})")
    return 0


def _any_model(name: str, num_classes: int, img_size: int):
    """A registered sparsebench model, else a timm model, else a torchvision model."""
    from sparsebench.models import MODELS, create_model

    if name in MODELS:
        return create_model(name, num_classes=num_classes, img_size=img_size)
    import timm
    import torchvision

    if name in timm.list_models():
        try:   # transformers take the resolution as an argument; CNNs take any input size
            return timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
        except TypeError:
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
    if name in torchvision.models.list_models():
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    raise CliError(f"unknown model {name!r}; allowed: a registered model ({', '.join(MODELS.names())}), "
                   f"or any timm or torchvision model name")


def cmd_speedup(args) -> int:
    import pandas as pd

    from sparsebench.runners.speedup import SpeedupConfig, speedup_environment, speedup_rows
    from sparsebench.models import MODELS
    from sparsebench.store.records import atomic_write_text

    for name in args.models:
        MODELS.get(name)
    for f in args.flops:
        if not 0 < f < 1:
            raise CliError(f"flops target {f} is out of range; allowed: 0 < flops < 1")
    _check_device(args.device)
    config = SpeedupConfig(models=tuple(args.models), flops=tuple(args.flops), img_size=args.img_size,
                           batch_sizes=tuple(args.batch_sizes), threads=tuple(args.threads), device=args.device,
                           dtype=args.dtype, compile=args.compile, channels_last=args.channels_last,
                           min_run_time=args.min_run_time, rounds=args.rounds)

    def report(row):
        if not args.quiet:
            print(f"  {row['model']:<14} flops={row['target_flops']:<5g} threads={row['threads']} "
                  f"batch={row['batch']:<4} theoretical {row['theoretical_speedup']:.2f}x  "
                  f"measured {row['measured_speedup']:.2f}x", flush=True)

    table = pd.DataFrame(speedup_rows(config, progress=report))
    columns = ["model", "target_flops", "achieved_flops_ratio", "threads", "batch", "dense_ms", "realized_ms",
               "theoretical_speedup", "measured_speedup", "measured_over_theoretical"]
    text = table[columns].to_markdown(index=False, floatfmt=".3f")
    print(text)
    if args.out:
        out = Path(args.out)
        env = speedup_environment(config)
        atomic_write_text(out / "speedup.csv", table.to_csv(index=False))
        atomic_write_text(out / "environment.json", json.dumps(env, indent=2))
        header = (f"# Structured speedup: theoretical vs measured ({env['device_name']}, {config.dtype})\n\n"
                  f"L1 structured pruning ({config.method}), physically compacted; dense and compacted timed in one "
                  f"process, alternating blocks, median of {config.rounds} blocks; torch {env['torch']}.\n\n")
        atomic_write_text(out / "speedup.md", header + text + "\n")
        print(f"wrote {out / 'speedup.md'}, {out / 'speedup.csv'}, {out / 'environment.json'}")
    return 0


# --- parser -------------------------------------------------------------------------------------
def _add_run_options(p: argparse.ArgumentParser, out_required: bool) -> None:
    p.add_argument("--out", required=out_required, default="results/local", help="results directory")
    p.add_argument("--data-root", default=os.environ.get("SPARSEBENCH_DATA"),
                   help="where datasets live (default $SPARSEBENCH_DATA or ~/.cache/sparsebench/data)")
    p.add_argument("--download", action="store_true", help="download missing datasets (needs internet)")
    p.add_argument("--cache-dir", help="dense checkpoint cache (default OUT/checkpoints)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--checkpoint-every", type=int, default=1000,
                   help="optimizer steps between mid-fit checkpoints (0: only at the end of each fit); "
                        "a killed run resumes from its last one")
    p.add_argument("--no-resume", action="store_true", help="no checkpoints: a killed run starts over")
    p.add_argument("--max-bad-samples", type=int, default=0,
                   help="image files that fail to decode: skip and count up to N (recorded); default 0 refuses any")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sparsebench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run one (method, model, dataset, target, seed)")
    p.add_argument("--method", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--target", default="none", help="sparsity=S or flops=F (0 < S, F < 1); none for dense")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--method-arg", action="append", metavar="NAME=VALUE", help="method knob (repeatable)")
    p.add_argument("--recipe", action="append", metavar="NAME=VALUE", help="recipe override (repeatable)")
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (training and timing)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="latency batch sizes (default 1 64)")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    weights = p.add_mutually_exclusive_group()
    weights.add_argument("--weights", help="local pretrained weights file the dense checkpoint starts from")
    weights.add_argument("--pretrained", action="store_true",
                         help="start the dense checkpoint from the library hub's ImageNet weights (needs internet)")
    p.add_argument("--measure", action="append", metavar="NAME=VALUE",
                   help="measurement setting (rounds, min_run_time, dtype, channels_last, compile; repeatable)")
    p.add_argument("--data", action="append", metavar="NAME=VALUE", help="data split setting (split_seed, workers)")
    p.add_argument("--force", action="store_true", help="re-run even if the record exists")
    _add_run_options(p, out_required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run a suite file (YAML); finished runs are skipped")
    p.add_argument("suite")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    p.add_argument("--dry-run", action="store_true", help="list runs and estimated cost, run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="run every (method, model, dataset, target) for a few steps, tiny, on fabricated data; "
                        "writes nothing to --out; exit 1 if any fails")
    p.add_argument("--shard", metavar="I/N", help="run only shard I of N (by spec hash), for several machines")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local: a process pool of --jobs workers; ray: one Ray task per run, on a local Ray "
                        "instance with --jobs CPUs or the cluster at --address")
    p.add_argument("--address", help="Ray cluster to join (e.g. auto, or HOST:6379), with --launcher ray")
    p.add_argument("--retry-failed", action="store_true",
                   help="run again only the runs recorded as failed")
    p.add_argument("--rerun", "--force", action="store_true", dest="rerun",
                   help="redo finished runs too (dense checkpoints stay cached; delete OUT/checkpoints to retrain)")
    p.add_argument("--compare", metavar="DIR",
                   help="after the sweep, print your top-1 and measured speedup against DIR's records "
                        "(e.g. the committed reference results/quick)")
    p.add_argument("--lock-timeout", type=float, default=24 * 3600.0, metavar="SECONDS",
                   help="give up on a run after this long waiting for a dense checkpoint another process holds "
                        "(the lock is left to its holder; other runs go on meanwhile)")
    p.add_argument("--progress-interval", type=float, default=15.0,
                   help="seconds between plain progress lines when output is not a terminal")
    p.add_argument("--assume-tflops", type=float, default=0.02,
                   help="sustained training TFLOP/s for --dry-run time estimates (2-core CPU ≈ 0.02, A100 ≈ 50)")
    _add_run_options(p, out_required=False)
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("leaderboard", help="leaderboard from the records in DIR")
    p.add_argument("dir")
    p.add_argument("--format", choices=("md", "csv", "html"), default="md")
    p.add_argument("--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_leaderboard)

    p = sub.add_parser("compare", help="two methods of DIR paired by seed: difference, interval, p-values, seeds needed")
    p.add_argument("dir")
    p.add_argument("a", metavar="A", help="method label as the leaderboard prints it, e.g. pass[residual_mode=coupled]")
    p.add_argument("b", metavar="B", help="the method to compare A with")
    p.add_argument("--target", help="only this target (sparsity=S, flops=F, or dense)")
    p.add_argument("--model", help="only this model")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("report", help="static HTML report (leaderboards, plots, run pages, protocol) from DIR's records")
    p.add_argument("dir")
    p.add_argument("--out", help="site folder (default DIR/report); open its index.html from disk")
    p.add_argument("--title")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("plot", help="accuracy vs MACs (or measured speedup) from the records in DIR")
    p.add_argument("dir")
    p.add_argument("--x", choices=("macs", "speedup"), default="macs")
    p.add_argument("--output")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("list", help="registered methods, models and datasets")
    p.add_argument("what", nargs="?", choices=("methods", "models", "datasets"))
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("check-data", help="decode every image file of a dataset; list the ones that fail")
    p.add_argument("dataset")
    p.add_argument("--data-root", default=os.environ.get("SPARSEBENCH_DATA"))
    p.add_argument("--img-size", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_check_data)

    p = sub.add_parser("flops", help="MACs/FLOPs of a model (attention matmuls included)")
    p.add_argument("model")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true")
    p.add_argument("--layers", action="store_true", help="include per-layer MACs (with --json)")
    p.add_argument("--fused-attention", action="store_true", help="leave fused attention on (shows the defect)")
    p.add_argument("--cross-check", action="store_true", help="also count with fvcore and print both side by side")
    p.set_defaults(func=cmd_flops)
    p = sub.add_parser("speedup", help="theoretical vs measured speedup of structured pruning")
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2", "deit_tiny", "deit_small"])
    p.add_argument("--flops", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--compile", action="store_true", help="time torch.compile'd models (a separate mode)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed CPU block")
    p.add_argument("--rounds", type=int, default=5, help="alternating blocks per model")
    p.add_argument("--out", help="write speedup.md / speedup.csv / environment.json here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_speedup)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from sparsebench.datasets import DataError
    from sparsebench.specs import SpecError
    from sparsebench.registry import UnknownNameError
    from sparsebench.platform import LockTimeout, StorageError, refused, storage_error

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()           # a closed pipe shows here, not in the interpreter's exit
        return code
    except BrokenPipeError:          # `sparsebench list | head -1`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141                   # 128 + SIGPIPE, as a tool killed by the signal would report
    except (CliError, SpecError, UnknownNameError, DataError, FileNotFoundError) as e:
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"sparsebench: error: {message}", file=sys.stderr)
        return ERROR_EXIT
    except (StorageError, LockTimeout) as e:        # a full or read-only disk, a lock its holder keeps
        print(f"sparsebench: error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        if not refused(e) or not e.filename:
            raise
        print(f"sparsebench: error: {storage_error(e, 'write', Path(e.filename))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:                  # SIGINT, or `Stopped` by SIGINT/SIGTERM
        print("sparsebench: interrupted; finished runs are saved, re-run the same command to resume", file=sys.stderr)
        return getattr(e, "exit_code", 130)


if __name__ == "__main__":
    sys.exit(main())

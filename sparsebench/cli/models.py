"""Models: load a run's saved model, export it, re-time every saved model of a directory on a device."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from sparsebench.cli.common import CliError, _check_device, _readable_records
from sparsebench.specs import RUNTIMES


def _load(args, device: str = "cpu"):
    from sparsebench.runners.artifacts import load_artifact

    return load_artifact(args.run, Path(args.dir), device)


def cmd_load(args) -> int:
    """Rebuild a run's model from its artifact; with --evaluate, its test top-1 against the record's."""
    loaded = _load(args)
    params = sum(p.numel() for p in loaded.model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in loaded.model.parameters())
    r = loaded.record
    head = f"run {loaded.run_id}" + (f" ({r.method} {r.model} {r.dataset} {r.target_label} seed {r.seed})" if r else "")
    print(f"{head}: {loaded.realization} model, {params:,d} params ({nonzero:,d} non-zero)"
          + (f", {len(loaded.masks)} masks" if loaded.masks else "")
          + f", from {loaded.path}" + (" (SHA-256 matches the record)" if r else " (no record beside it: unchecked)"))
    if args.evaluate:
        from sparsebench.runners.artifacts import evaluate_loaded

        acc = evaluate_loaded(loaded, args.data_root)
        same = r is not None and acc.top1 == r.test_top1
        print(f"test top-1 {100 * acc.top1:.2f}% on {acc.n} samples"
              + (f"; the record says {100 * r.test_top1:.2f}%: " + ("identical" if same else "DIFFERENT")
                 if r is not None and r.test_top1 is not None else ""))
        return 0 if same or r is None else 1
    return 0


def cmd_export(args) -> int:
    """A deployable file (ONNX, TorchScript, torch.export) whose outputs were checked against PyTorch's."""
    from sparsebench.runners.export import FORMATS, export_model

    if args.batch < 1:
        raise CliError(f"bad --batch {args.batch}; allowed: an integer >= 1")
    loaded = _load(args)
    output = Path(args.output) if args.output else Path(args.dir) / "exports" / f"{loaded.run_id}{FORMATS[args.format]}"
    done = export_model(loaded, args.format, output, args.batch)
    print(f"wrote {done.path} ({os.path.getsize(done.path):,d} bytes, {done.format}); outputs match PyTorch's on a "
          f"batch of {done.batch} (max |Δ| {done.max_abs_error:.2g}); {done.note}")
    return 0


def cmd_retime(args) -> int:
    """Dense vs realized latency of every saved model in DIR, timed on --device, added to each record
    as its own device entry."""
    from sparsebench.report.leaderboard import realization_label
    from sparsebench.runners.artifacts import retime_directory

    _check_device(args.device)
    if args.batch_sizes and min(args.batch_sizes) < 1:
        raise CliError(f"bad --batch-sizes {args.batch_sizes}; allowed: integers >= 1")
    _readable_records(args.dir)          # one line for a directory without records, before any timing

    def report(record, runs):
        if args.quiet:
            return
        parts = []
        for run in runs:
            if run["measured_speedup"]:
                kind = realization_label(run["realization"]) or run["realization"]["kind"]
                parts.append(f"{run['measured_speedup']:.2f}× ({kind}, {run['runtime']})")
            else:
                parts.append(run["reason"] or "not timed")
        print(f"  {record.method:<20} {record.model:<16} {record.target_label:<14} seed {record.seed}: "
              + "; ".join(dict.fromkeys(parts)), flush=True)

    if args.max_seconds is not None and args.max_seconds <= 0:
        raise CliError(f"bad --max-seconds {args.max_seconds}; allowed: a number > 0")
    result = retime_directory(Path(args.dir), args.device, args.dtype, args.batch_sizes, args.threads, report,
                              args.max_seconds, runtimes=tuple(args.runtime), realizations=tuple(args.realization))
    for line in result.errors:
        print(f"sparsebench: error: {line}", file=sys.stderr)
    print(f"retimed {len(result.retimed)} runs on {args.device}"
          + (f"; {len(result.without_model)} runs have no saved model" if result.without_model else "")
          + (f"; {len(result.left_for_time)} runs not reached within --max-seconds {args.max_seconds:g}"
             if result.left_for_time else "")
          + (f"; {len(result.errors)} models unusable (above)" if result.errors else "")
          + f"; `sparsebench leaderboard {args.dir}` shows each device's fastest (realization, runtime)")
    return 1 if result.errors else 0


def add_parsers(sub) -> None:
    p = sub.add_parser("load", help="rebuild a run's saved model (masked or compacted); --evaluate checks its top-1")
    p.add_argument("run", metavar="RUN_ID_OR_PATH", help="run id (or unique prefix) in --dir, a record .json, "
                                                          "or a .safetensors model file")
    p.add_argument("--dir", default="results/local", help="results directory holding records/ and models/")
    p.add_argument("--evaluate", action="store_true", help="evaluate on the run's test split; exit 1 if the top-1 "
                                                           "differs from the record's")
    p.add_argument("--data-root", default=os.environ.get("SPARSEBENCH_DATA"))
    p.set_defaults(func=cmd_load)

    p = sub.add_parser("export", help="write a run's model as ONNX, TorchScript or torch.export, checked against PyTorch")
    p.add_argument("run", metavar="RUN_ID_OR_PATH")
    p.add_argument("--dir", default="results/local", help="results directory holding records/ and models/")
    p.add_argument("--format", choices=("onnx", "torchscript", "export"), required=True)
    p.add_argument("--output", help="file to write (default DIR/exports/<run_id>.<ext>)")
    p.add_argument("--batch", type=int, default=8, help="batch the outputs are compared on")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("retime", help="re-time every saved model in DIR on a device; adds device-keyed entries")
    p.add_argument("dir")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="default: each run's own")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default: each run's own")
    p.add_argument("--threads", type=int, help="CPU threads (default: each run's own)")
    p.add_argument("--runtime", nargs="+", choices=RUNTIMES, default=["eager"],
                   help="runtimes to time under, dense and realized both (one that cannot run a realization "
                        "records 'not supported by RUNTIME: why')")
    p.add_argument("--realization", nargs="+", choices=("auto", "csr"), default=["auto"],
                   help="realizations of unstructured masks (dense, compacted and 2:4 runs keep their own)")
    p.add_argument("--max-seconds", type=float, help="time budget: each timing gets a share of what is left; "
                                                     "runs not reached are listed and left as they are")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_retime)

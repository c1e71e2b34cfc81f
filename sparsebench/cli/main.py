"""The `sparsebench` command line.

    sparsebench run --method gmp --model resnet20_tiny --dataset digits --target sparsity=0.9 --seed 0 --out DIR
    sparsebench sweep benchmarks/quick.yaml --out DIR [--jobs N] [--launcher local|ray [--address A]]
                      [--retry-failed] [--dry-run] [--lock-timeout SECONDS]
    sparsebench leaderboard DIR          sparsebench plot DIR          sparsebench report DIR --out SITE
    sparsebench compare DIR A B [--target sparsity=0.9] [--model M] [--format text|json]
    sparsebench list [methods|models|datasets]
    sparsebench check-data DATASET [--data-root DIR] [--img-size N] [--full]
    sparsebench flops MODEL [--img-size N] [--json] [--cross-check]
    sparsebench speedup [--models ...] [--flops 0.75 0.5 0.25] [--sparsity 0.9 0.95] [--out results/speedup/cpu]
    sparsebench load RUN [--dir DIR] [--evaluate]      sparsebench export RUN --format onnx|torchscript|export
    sparsebench retime DIR --device cpu|cuda [--dtype ...] [--batch-sizes ...]

Bad input ends with one line on stderr naming the bad value and what is allowed, exit
code 2, and nothing written to the results store.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import List, Optional

from sparsebench.cli import models as model_commands
from sparsebench.cli.common import ERROR_EXIT, CliError
from sparsebench.cli.results import cmd_compare, cmd_leaderboard, cmd_plot, cmd_report
from sparsebench.cli.runs import cmd_run, cmd_sweep
from sparsebench.specs import RUNTIMES
from sparsebench.cli.tools import cmd_check_data, cmd_flops, cmd_list, cmd_speedup


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
    p.add_argument("--no-save-models", action="store_true",
                   help="do not keep each run's final model (default: OUT/models/<run_id>.safetensors, "
                        "named with its SHA-256 in the record)")
    p.add_argument("--tracker", choices=("tensorboard", "mlflow", "none"), default="tensorboard",
                   help="live curves while training: TensorBoard event files under OUT/tb/<run_id>/ (default); "
                        "mlflow: those and an MLflow run (spec as params, record and model as artifacts); "
                        "none: neither")
    p.add_argument("--tracker-uri", metavar="URI",
                   help="MLflow tracking URI for --tracker mlflow (default: sqlite:///OUT/mlflow.db)")


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
    p.add_argument("--progress-interval", type=float, default=30.0, metavar="SECONDS",
                   help="seconds between plain progress lines (stage, step, ETA, last val top-1) when output "
                        "is not a terminal")
    _add_run_options(p, out_required=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("sweep", help="run a suite file (YAML); finished runs are skipped")
    p.add_argument("suite")
    from sparsebench.runners.pool import jobs_arg
    p.add_argument("--jobs", type=jobs_arg, default="auto",
                   help="parallel worker processes (auto: one per core; on --device cuda one per GPU, each on its own)")
    p.add_argument("--jobs-per-gpu", type=int, metavar="N",
                   help="on --device cuda: N workers per GPU, for runs small enough that N fit its memory "
                        "(checked against the peak memory OUT's finished runs measured, where they did)")
    p.add_argument("--dry-run", action="store_true", help="list runs and estimated cost, run nothing")
    p.add_argument("--smoke", action="store_true",
                   help="run every (method, model, dataset, target) for a few steps, tiny, on fabricated data; "
                        "writes nothing to --out; exit 1 if any fails")
    p.add_argument("--rehearse", action="store_true",
                   help="run every (method, model, dataset, target) at its real model and resolution on fabricated "
                        "data at real image sizes, a few steps per stage; writes per-stage step time, memory, "
                        "/dev/shm, loader images/s and projected device-hours to OUT/rehearsal.{json,md}")
    p.add_argument("--device-batch", type=int, metavar="N",
                   help="with --rehearse: images the device takes at once; on a GPU the suite's batch runs in "
                        "micro-batches of N (default: the recipe's device_batch), on a CPU a step is timed at N "
                        "images (default 8) and scaled to the suite's batch")
    p.add_argument("--rehearse-cover", choices=("datasets", "pairs"), default="datasets",
                   help="with --rehearse: every (method, model, dataset) (default), or every (method, model) pair "
                        "with each of a model's datasets read at least once (suites whose datasets share a size)")
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
    p.add_argument("--equal-cost", choices=("steps", "macs"),
                   help="equal-cost view: rank only rows whose total training steps (or forward+backward "
                        "MACs) agree within --cost-tolerance; a pruning method is charged its dense pretrain")
    p.add_argument("--cost-tolerance", type=float, default=0.15,
                   help="relative cost spread within one equal-cost group (default 0.15)")
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

    p = sub.add_parser("check-data", help="check a dataset's image files (metadata, a decoded sample; --full: "
                                          "decode every file); list the ones that fail")
    p.add_argument("dataset")
    p.add_argument("--full", action="store_true", help="decode every image file, whatever verdict is cached")
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
    p = sub.add_parser("speedup", help="theoretical vs measured speedup of structured and unstructured pruning")
    p.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "mobilenet_v2", "deit_tiny", "deit_small"])
    p.add_argument("--flops", type=float, nargs="*", default=[0.75, 0.5, 0.25],
                   help="structured (L1 channel/head) FLOPs targets; none: no structured rows")
    p.add_argument("--sparsity", type=float, nargs="*", default=[],
                   help="unstructured targets: magnitude masks at these sparsities, timed per realization")
    p.add_argument("--kernels", nargs="+", choices=("auto", "csr"), default=["auto", "csr"],
                   help="realizations of the unstructured masks (auto: per layer the faster of dense and CSR)")
    p.add_argument("--mask-scope", choices=("layerwise", "global"), default="layerwise",
                   help="magnitude ranking per layer or over all prunable layers")
    p.add_argument("--calibration-seconds", type=float, default=30.0,
                   help="bound on auto's per-layer calibration per (model, sparsity, threads, batch)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.add_argument("--compile", action="store_true", help="also time under torch.compile (same as adding "
                                                          "--runtimes compile)")
    p.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=["eager"],
                   help="runtimes to time dense and realized under (onnxruntime: CPU execution provider; a "
                        "realization a runtime cannot run gets a 'not supported by RUNTIME' row)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--min-run-time", type=float, default=0.2, help="seconds per timed CPU block")
    p.add_argument("--rounds", type=int, default=5, help="alternating blocks per model")
    p.add_argument("--out", help="write speedup.md / speedup.csv / environment.json here")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_speedup)
    model_commands.add_parsers(sub)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    from sparsebench.datasets import DataError
    from sparsebench.specs import SpecError
    from sparsebench.registry import UnknownNameError
    from sparsebench.platform import LockTimeout, StorageError, refused, storage_error
    from sparsebench.errors import ArtifactError

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
    except (CliError, SpecError, UnknownNameError, DataError, FileNotFoundError, ArtifactError) as e:
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

"""The `sparsebench` command line: one module per command family, the argparse wiring in `main`.

    runs      run, sweep
    results   leaderboard, report, plot, compare
    tools     list, check-data, flops, speedup
"""
from sparsebench.cli.common import ERROR_EXIT, CliError, _kv
from sparsebench.cli.main import build_parser, main
from sparsebench.cli.runs import _spec_from_args

__all__ = ["ERROR_EXIT", "CliError", "build_parser", "main"]

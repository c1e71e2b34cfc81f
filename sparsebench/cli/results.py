"""Results: leaderboard, report, plot and compare, rebuilt from a directory's records."""
from __future__ import annotations

import json
from pathlib import Path

from sparsebench.cli.common import CliError, _readable_records, _wrote


def cmd_report(args) -> int:
    from sparsebench.report.site import build_site

    records = _readable_records(args.dir)
    out = Path(args.out) if args.out else Path(args.dir) / "report"
    files = build_site(records, out, title=args.title or f"sparsebench leaderboard: {Path(args.dir).name}")
    print(_wrote(files, out))
    print(f"open {out / 'index.html'} in a browser (no server needed)")
    return 0


def cmd_leaderboard(args) -> int:
    from sparsebench.report import Leaderboard, display_table, table_csv, to_markdown

    if not 0 <= args.cost_tolerance < 1:
        raise CliError(f"--cost-tolerance must be in [0, 1), got {args.cost_tolerance}")
    board = Leaderboard.of(_readable_records(args.dir), equal_cost=args.equal_cost, cost_tolerance=args.cost_tolerance)
    agg = board.table
    if args.format == "csv":
        text = table_csv(agg)
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

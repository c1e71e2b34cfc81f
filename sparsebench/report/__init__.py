"""Reports rebuilt from records only: leaderboards (Markdown/CSV/HTML) and plots."""
from pathlib import Path

from sparsebench.report.leaderboard import (
    Leaderboard, aggregate, display_table, excluded, records_frame, to_markdown,
)
from sparsebench.store.records import atomic_write_text, load_records


def leaderboard_of(results_dir: Path) -> Leaderboard:
    """The leaderboard of a results directory: aggregated "ok" runs, and the runs left out."""
    return Leaderboard.of(load_records(Path(results_dir)))


def write_reports(results_dir: Path, title: str = "Leaderboard") -> dict:
    """Rebuild leaderboard.{md,csv,html} and the two plots in `results_dir` from its records."""
    from sparsebench.report.plots import plot

    results_dir = Path(results_dir)
    board = leaderboard_of(results_dir)
    agg = board.table
    paths = {}
    markdown = to_markdown(agg, title, board.excluded)
    atomic_write_text(results_dir / "leaderboard.md", markdown)
    atomic_write_text(results_dir / "leaderboard.csv", agg.to_csv(index=False))
    atomic_write_text(results_dir / "leaderboard.html", display_table(agg).to_html(index=False))
    paths["markdown"] = results_dir / "leaderboard.md"
    if not agg.empty:
        paths["plot"] = plot(agg, results_dir / "accuracy_vs_flops.png", x="macs")
        if agg["realizable"].any():
            paths["speedup_plot"] = plot(agg, results_dir / "accuracy_vs_speedup.png", x="speedup")
    paths["text"] = markdown
    return paths


__all__ = ["Leaderboard", "aggregate", "display_table", "excluded", "leaderboard_of", "records_frame",
           "to_markdown", "write_reports"]

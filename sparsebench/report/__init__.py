"""Reports rebuilt from records only: leaderboards (Markdown/CSV/HTML) and plots."""
from pathlib import Path

from sparsebench.report.leaderboard import aggregate, display_table, records_frame, to_markdown
from sparsebench.store.records import atomic_write_text, load_records


def leaderboard_of(results_dir: Path):
    """The aggregated leaderboard (one row per dataset, model, method, target) of a results directory."""
    return aggregate(records_frame(load_records(Path(results_dir))))


def write_reports(results_dir: Path, title: str = "Leaderboard") -> dict:
    """Rebuild leaderboard.{md,csv,html} and the two plots in `results_dir` from its records."""
    from sparsebench.report.plots import plot

    results_dir = Path(results_dir)
    agg = leaderboard_of(results_dir)
    paths = {}
    markdown = to_markdown(agg, title)
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


__all__ = ["aggregate", "display_table", "leaderboard_of", "records_frame", "to_markdown", "write_reports"]

"""Reports rebuilt from records only: leaderboards (Markdown/CSV/HTML) and plots."""
from pathlib import Path

from sparsebench.report.leaderboard import (
    Leaderboard, aggregate, display_table, excluded, records_frame, table_csv, to_markdown,
)
from sparsebench.store.records import atomic_write_text, load_records


def leaderboard_of(results_dir: Path) -> Leaderboard:
    """The leaderboard of a results directory: aggregated "ok" runs, and the runs left out."""
    return Leaderboard.of(load_records(Path(results_dir)))


def write_reports(results_dir: Path, title: str = "Leaderboard", site: bool = True) -> dict:
    """Rebuild leaderboard.{md,csv,html}, the two plots and (with `site`) the static report
    `report/` in `results_dir` from its records. `files` lists every file written."""
    from sparsebench.report.plots import plot
    from sparsebench.report.runs import runs_frame, summarize
    from sparsebench.report.site import build_site
    from sparsebench.report.speedup import entries_frame, plot_measured_vs_theoretical

    results_dir = Path(results_dir)
    records = load_records(results_dir)
    board = Leaderboard.of(records)
    agg = board.table
    paths = {}
    markdown = to_markdown(agg, title, board.excluded)
    atomic_write_text(results_dir / "leaderboard.md", markdown)
    atomic_write_text(results_dir / "leaderboard.csv", table_csv(agg))
    atomic_write_text(results_dir / "leaderboard.html", display_table(agg).to_html(index=False))
    paths["markdown"] = results_dir / "leaderboard.md"
    files = [results_dir / "leaderboard.md", results_dir / "leaderboard.csv", results_dir / "leaderboard.html"]
    if not agg.empty:
        summary = summarize(runs_frame(records))
        paths["plot"] = plot(summary, results_dir / "accuracy_vs_flops.png", x="macs")
        paths["speedup_plot"] = plot(summary, results_dir / "accuracy_vs_speedup.png", x="speedup")
        files += [paths["plot"], paths["speedup_plot"]]
        kernels = plot_measured_vs_theoretical(entries_frame(records), results_dir / "measured_vs_theoretical.png",
                                               "every latency entry: measured against theoretical speedup")
        if kernels is not None:
            paths["kernels_plot"] = kernels
            files.append(kernels)
    if site:
        paths["site"] = results_dir / "report"
        files += build_site(records, results_dir / "report", title=title)
    paths["files"] = files
    paths["text"] = markdown
    return paths


__all__ = ["Leaderboard", "aggregate", "display_table", "excluded", "leaderboard_of", "records_frame",
           "table_csv", "to_markdown", "write_reports"]

"""Refresh the README's quick-suite leaderboard, speedup table and the evidence tables (PASS, OFB,
GaP/RigL/SET at equal steps and at equal training MACs, the SViTE family) from `results/` (run
after a sweep).

    python benchmarks/update_readme.py
"""
from __future__ import annotations

import re
from pathlib import Path

from sparsebench.report.leaderboard import Leaderboard, display_table
from sparsebench.report.speedup import speedup_summary
from sparsebench.runners.pipeline import resolve
from sparsebench.runners.suite import load_suite
from sparsebench.store import load_records

ROOT = Path(__file__).resolve().parents[1]


def replace_between(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(\n<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no {name} markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


EVIDENCE_COLUMNS = ["target", "rank", "method", "top1 (%)", "Δ control", "Δ baseline", "FLOPs ratio",
                    "measured speedup", "mechanism", "seeds"]


EVIDENCE_KEY = ("Δ control, Δ baseline: mean ± 95 % interval over seeds and test images (‡: seed-level only), n "
                "pairs, the t-test's p, its Holm adjustment over every Δ control and Δ baseline test of the model's "
                "table, and the exact sign-flip p. rank: 1 + the rows significantly better (every pair of rows, "
                "Holm-corrected); \"=\": a shared rank. Full notes under the quick-suite leaderboard.")


def evidence_table(suite: str, equal_cost: str = None) -> str:
    """The evidence suite's rows from results/evidence (only the runs the suite file plans), one
    compact table per model, and the runs left out of the means with their reasons; `equal_cost`
    ("macs"): the equal-training-MACs view, with its cost column."""
    planned = {resolve(s).hash for s in load_suite(ROOT / "benchmarks" / "evidence" / f"{suite}.yaml").specs}
    records = [r for r in load_records(ROOT / "results" / "evidence") if r.spec_hash in planned]
    board = Leaderboard.of(records, equal_cost=equal_cost)
    table = display_table(board.table)
    columns = EVIDENCE_COLUMNS if equal_cost is None else (
        ["target", "cost", "rank", "method", "top1 (%)", "Δ baseline", "train GMACs", "mechanism", "seeds"])
    parts = [f"{len(records)} of {len(planned)} planned runs recorded.", ""]
    for model, part in table.groupby("model", sort=False):
        parts += [f"{model}", "", part[columns].to_markdown(index=False), ""]
    if not board.excluded.empty:
        left = board.excluded[["target", "method", "seed", "status", "detail"]]
        parts += ["Left out of the means:", "", left.to_markdown(index=False), ""]
    parts += [EVIDENCE_KEY, ""]
    return "\n".join(parts).strip()


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    leaderboard = (ROOT / "results" / "quick" / "leaderboard.md").read_text()
    body = leaderboard.split("\n", 2)[2].strip().replace("\n## ", "\n### ")
    body = "### " + body[3:] if body.startswith("## ") else body
    readme = replace_between(readme, "quick-leaderboard", body)
    readme = replace_between(readme, "speedup-table",
                             speedup_summary(ROOT / "results" / "speedup" / "cpu" / "speedup.csv"))
    for suite in ("pass", "ofb", "gap", "svite"):
        readme = replace_between(readme, f"evidence-{suite}", evidence_table(suite))
    readme = replace_between(readme, "evidence-gap-macs", evidence_table("gap", equal_cost="macs"))
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()

"""Refresh the README's quick-suite leaderboard and speedup table from `results/` (run after a sweep).

    python benchmarks/update_readme.py
"""
from __future__ import annotations

import re
from pathlib import Path

from sparsebench.report.speedup import speedup_summary

ROOT = Path(__file__).resolve().parents[1]


def replace_between(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- {name}:start -->\n).*?(\n<!-- {name}:end -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"README has no {name} markers")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main() -> None:
    readme = (ROOT / "README.md").read_text()
    leaderboard = (ROOT / "results" / "quick" / "leaderboard.md").read_text()
    body = leaderboard.split("\n", 2)[2].strip().replace("\n## ", "\n### ")
    body = "### " + body[3:] if body.startswith("## ") else body
    readme = replace_between(readme, "quick-leaderboard", body)
    readme = replace_between(readme, "speedup-table",
                             speedup_summary(ROOT / "results" / "speedup" / "cpu" / "speedup.csv"))
    (ROOT / "README.md").write_text(readme)


if __name__ == "__main__":
    main()

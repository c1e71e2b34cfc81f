"""The README stays true and short: its leaderboard is the committed one, its example method runs,
its test command is the one CI runs, and it reads in five minutes."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
README_MAX_BYTES = 20_000


def markdown_tables(text: str) -> dict:
    """{heading above the table: [{column: cell}]} for the Markdown tables under `##`/`###` headings."""
    tables, heading, columns = {}, None, None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, columns = line.lstrip("#").strip(), None
        elif line.startswith("|") and heading is not None:
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if columns is None:
                columns = cells
            elif not all(set(cell) <= set(":-") for cell in cells):
                tables.setdefault(heading, []).append(dict(zip(columns, cells)))
    return tables


def test_readme_leaderboard_is_the_committed_one():
    """Every row of the README's short leaderboard is a row of results/quick/leaderboard.md, cell
    for cell in the columns it shows, and no row of the committed leaderboard is left out."""
    committed = markdown_tables((ROOT / "results" / "quick" / "leaderboard.md").read_text())
    shown = markdown_tables(README.split("<!-- quick-leaderboard:start -->", 1)[1].split("<!-- quick-leaderboard:end -->")[0])
    model_tables = {heading for heading in committed if " on " in heading}        # "resnet20_tiny on digits"
    assert model_tables and shown.keys() == model_tables
    for heading, rows in shown.items():
        full = committed[heading]
        assert len(rows) == len(full), heading
        for row, full_row in zip(rows, full):
            assert row == {column: full_row[column] for column in row}, (heading, row)
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / image).is_file(), image


def test_speedup_table_is_the_committed_one():
    from sparsebench.report.speedup import speedup_summary

    summary = speedup_summary(ROOT / "results" / "speedup" / "cpu" / "speedup.csv")
    assert summary in (ROOT / "docs" / "measurement.md").read_text()


def test_readme_reads_in_five_minutes():
    """The front page stays short: the rest lives in docs/, and the README links every page there."""
    assert len(README.encode()) <= README_MAX_BYTES
    for page in (ROOT / "docs").glob("*.md"):
        assert f"](docs/{page.name}" in README, page.name


def test_readme_test_command_is_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python -m pytest -q" in README and "python -m pytest -q" in ci


def test_add_a_method_example_runs(tmp_path):
    from sparsebench.runners.pipeline import RunOptions, execute
    from sparsebench.methods import METHODS

    from conftest import tiny_spec

    block = README.split("# mymethod.py\n", 1)[1].split("```", 1)[0]
    namespace = {}
    exec(compile(block, "README:mymethod.py", "exec"), namespace)
    try:
        record = execute(tiny_spec("taylor-global", target="sparsity=0.8"), RunOptions(out=tmp_path))
        assert record.achieved_sparsity == pytest.approx(0.8, abs=0.01)
    finally:
        METHODS._entries.pop("taylor-global")

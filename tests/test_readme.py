"""The README stays true: its leaderboard is the committed one, its example method runs,
and its test command is the one CI runs."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def table_lines(text: str):
    return [line for line in text.splitlines() if line.startswith("|")]


def test_readme_leaderboard_is_the_committed_one():
    committed = (ROOT / "results" / "quick" / "leaderboard.md").read_text()
    assert table_lines(committed) and "\n".join(table_lines(committed)) in "\n".join(table_lines(README))
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", README):
        assert (ROOT / image).is_file(), image


def test_readme_speedup_table_is_the_committed_one():
    from sparsebench.report.speedup import speedup_summary

    summary = speedup_summary(ROOT / "results" / "speedup" / "cpu" / "speedup.csv")
    assert summary in README


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

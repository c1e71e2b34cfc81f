"""`benchmarks/update_readme.py --check`: the committed README and docs/ hold every generated block
as a fresh regeneration from results/ writes it, and a hand-edited number in one is caught, named
by file and block, without anything being written."""
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "update_readme.py"


@pytest.fixture(scope="module")
def update_readme():
    spec = importlib.util.spec_from_file_location("update_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module            # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def checkout_copy(tmp_path: Path) -> Path:
    """The files the generated blocks live in, copied (to be edited); what they are made from,
    linked (read only)."""
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    shutil.copy(ROOT / "README.md", root / "README.md")
    for page in (ROOT / "docs").glob("*.md"):
        shutil.copy(page, root / "docs" / page.name)
    (root / "results").symlink_to(ROOT / "results")
    (root / "benchmarks").symlink_to(ROOT / "benchmarks")
    return root


def test_every_generated_block_is_up_to_date_in_the_committed_tree(update_readme):
    assert update_readme.stale_blocks(ROOT) == []
    names = {(block.file, block.name) for block in update_readme.BLOCKS}
    for file, name in names:                   # every block has its markers where it is declared
        assert update_readme.block_body((ROOT / file).read_text(), name) is not None, (file, name)
    assert ("docs/measurement.md", "unstructured-table") in names


def test_check_names_the_file_and_block_of_a_hand_edited_number_and_writes_nothing(tmp_path, capsys, update_readme):
    root = checkout_copy(tmp_path)
    page = root / "docs" / "evidence.md"
    text = page.read_text()
    body = update_readme.block_body(text, "evidence-ofb")
    row = next(line for line in body.splitlines() if line.startswith("| flops"))
    top1 = row.split("|")[4]                   # target | rank | method | top1 (%) | ...
    edited_row = row.replace(top1, top1.replace(top1.strip()[:2], "11" if top1.strip()[:2] != "11" else "22", 1), 1)
    edited_body = body.replace(row, edited_row, 1)
    assert edited_body != body
    page.write_text(text.replace(body, edited_body))
    edited = page.read_text()

    assert update_readme.stale_blocks(root) == ["docs/evidence.md: block evidence-ofb"]
    assert update_readme.main(["--check", "--root", str(root)]) == 1
    message = capsys.readouterr().err.strip()
    assert "\n" not in message and message.startswith("docs/evidence.md: block evidence-ofb differs"), message
    assert page.read_text() == edited          # --check writes nothing

    assert update_readme.main(["--root", str(root)]) == 0     # without --check the block is rewritten
    assert page.read_text() == text


def test_a_missing_unstructured_table_leaves_its_block_empty(tmp_path, update_readme):
    root = tmp_path / "empty"
    (root / "results" / "speedup").mkdir(parents=True)
    assert update_readme.unstructured_speedup(root) is None
    text = "a\n<!-- unstructured-table:start -->\n<!-- unstructured-table:end -->\nb\n"
    assert update_readme.replace_between(text, "unstructured-table", "| x |\n") == \
        "a\n<!-- unstructured-table:start -->\n| x |\n<!-- unstructured-table:end -->\nb\n"
    assert update_readme.replace_between(text, "unstructured-table", "") == text

"""The README and docs/ hold together: every relative link and image points at a file of the
repository, and every #anchor at a heading of the page it names (GitHub's heading ids)."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str):
    """The page's lines outside fenced code blocks, where Markdown reads links and headings."""
    in_code = False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            yield line


def heading_ids(text: str) -> set:
    """GitHub's ids for the page's headings: lower case, inline code marks and punctuation dropped
    (hyphens and underscores kept), spaces to hyphens; a repeated id gets -1, -2, ..."""
    ids, seen = set(), {}
    for line in prose_lines(text):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        ids.add(slug if count == 0 else f"{slug}-{count}")
    return ids


def links(page: Path):
    return [target for line in prose_lines(page.read_text()) for target in LINK.findall(line)
            if not re.match(r"[a-z][a-z0-9+.-]*:", target)]          # http:, https:, mailto: are not ours


def test_heading_ids_follow_github():
    text = "# A title\n## Rehearsing a suite at full size: `--rehearse`\n## Reports\n## Reports\n```\n# not a heading\n```\n"
    assert heading_ids(text) == {"a-title", "rehearsing-a-suite-at-full-size---rehearse", "reports", "reports-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(page):
    assert links(page) or page.name != "README.md"
    broken = []
    for target in links(page):
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists() or ROOT not in file.parents:
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in heading_ids(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)

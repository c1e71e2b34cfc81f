"""benchmarks/references.yaml: every entry names its source and matches a setting of a committed suite."""
from pathlib import Path

import pytest

from sparsebench.report.references import DEFAULT_PATH, load_references
from sparsebench.runners.pipeline import resolve
from sparsebench.runners.suite import load_suite

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def settings():
    """(method, resolved args, model, dataset, target) of every run of the paper suites."""
    out = []
    for path in sorted((ROOT / "benchmarks" / "papers").glob("*.yaml")):
        for spec in load_suite(path).specs:
            out.append((spec.method, dict(resolve(spec).method_args), spec.model, spec.dataset, spec.target))
    return out


def test_the_reference_file_is_the_one_the_report_reads():
    assert DEFAULT_PATH == ROOT / "benchmarks" / "references.yaml"


def test_every_reference_names_a_source_and_matches_a_suite_setting(settings):
    references = load_references(DEFAULT_PATH)
    assert len(references) >= 10
    for ref in references:
        assert len(ref.source) > 10, ref
        assert ref.top1 is not None or ref.claim, ref
        assert any(ref.matches(*s) for s in settings), f"no suite runs {ref.method} {ref.args} {ref.model} " \
                                                       f"{ref.dataset} {ref.target}"


def test_each_seed_paper_has_its_headline(settings):
    methods = {r.method for r in load_references(DEFAULT_PATH)}
    assert {"gap-cyclic", "gap-parallel", "rigl", "ofb", "s2vite", "svite-plus", "pass"} <= methods
    assert all(r.reconstruction == (r.method == "pass") for r in load_references(DEFAULT_PATH))

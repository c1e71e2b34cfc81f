"""Published numbers beside ours: references match leaderboard rows by method, arguments,
model, dataset and target, and the leaderboard and the report show them."""
import pytest

from sparsebench.report.leaderboard import Leaderboard, to_markdown
from sparsebench.report.references import load_references, parse_entry, published_columns
from sparsebench.specs import SpecError

from conftest import make_record

GAP_ARGS = {"num_groups": 4, "rounds": 10, "restart_optimizer": True, "lr_restart": True}


def gap_record(seed, top1, distribution="uniform", target=0.8, model="resnet50", dataset="imagenet"):
    return make_record("gap-cyclic", seed, top1, target, "sparsity", model=model, dataset=dataset,
                       spec={"method_args": {**GAP_ARGS, "distribution": distribution}},
                       run_id=f"gap-{distribution}-{model}-{dataset}-{seed}-{target}")


@pytest.fixture
def references():
    return load_references()


def test_a_matching_run_shows_the_published_number_and_the_difference(references):
    board = Leaderboard.of([gap_record(0, 0.7700), gap_record(1, 0.7750)])
    md = to_markdown(board.table)
    header = next(line for line in md.splitlines() if line.startswith("| target"))
    row = next(line for line in md.splitlines() if "gap-cyclic" in line)
    cells = dict(zip([c.strip() for c in header.split("|")], [c.strip() for c in row.split("|")]))
    assert cells["top1 (%)"].startswith("77.25")
    assert cells["published"] == "77.86"                  # README: S-GaP, 4 partitions, 0.8, uniform: 77.856 %
    assert cells["Δ published"] == "-0.61"                # 77.25 - 77.856
    assert "benchmarks/references.yaml" in md


def test_the_arguments_decide_which_reference_matches(references):
    erk = Leaderboard.of([gap_record(0, 0.78, distribution="erk", target=0.9)]).table
    columns = published_columns(erk, references)
    assert list(columns["published"]) == ["77.90"]        # non-uniform (our ERK), 0.9: 77.896
    other = Leaderboard.of([make_record("gap-cyclic", 0, 0.78, 0.9, spec={"method_args": {"num_groups": 3}},
                                        model="resnet50", dataset="imagenet")]).table
    assert published_columns(other, references).empty    # κ = 3 is not the README's setting


def test_no_published_columns_where_no_reference_matches(references):
    board = Leaderboard.of([gap_record(0, 0.97, model="resnet20_tiny", dataset="digits")])
    md = to_markdown(board.table)
    assert "published" not in md
    assert published_columns(board.table, references).empty


def test_the_report_shows_published_beside_ours(tmp_path, references):
    from sparsebench.report.site import build_site

    build_site([gap_record(0, 0.7700), gap_record(1, 0.7750)], tmp_path, svg=False)
    index = (tmp_path / "index.html").read_text()
    section = index.split('id="published"', 1)[1]
    assert "77.86" in section and "-0.61" in section and "boone891214/GaP@28582cf" in section


def test_a_relative_claim_shows_as_text_without_a_difference(references):
    rec = make_record("pass", 0, 0.80, 0.5, "flops", model="resnet18", dataset="food101",
                      spec={"method_args": {"residual_mode": "coupled"}})
    columns = published_columns(Leaderboard.of([rec]).table, references)
    assert columns["published"].iloc[0].startswith("(1-3 top-1 points") and columns["published"].iloc[0].endswith("†")
    assert columns["Δ published"].iloc[0] == ""


@pytest.mark.parametrize("missing", ["source", "top1", "target", "args"])
def test_an_entry_missing_a_field_is_one_clear_error(missing):
    entry = {"method": "rigl", "args": {}, "model": "resnet50", "dataset": "imagenet", "target": "sparsity=0.8",
             "top1": 75.12, "top5": None, "gmacs": None, "flops_ratio": 0.42, "source": "README",
             "reconstruction": False, "match": None}
    parse_entry(entry, "entry 1")
    del entry[missing]
    with pytest.raises(SpecError, match=f"missing field '{missing}'") as e:
        parse_entry(entry, "entry 1")
    assert "\n" not in str(e.value)


def test_a_null_top1_needs_a_claim():
    entry = {"method": "pass", "args": {}, "model": None, "dataset": "food101", "target": None, "top1": None,
             "top5": None, "gmacs": None, "flops_ratio": None, "source": "abstract", "reconstruction": True,
             "match": None}
    with pytest.raises(SpecError, match="claim"):
        parse_entry(entry, "entry 1")

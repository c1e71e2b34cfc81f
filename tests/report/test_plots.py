"""Paper plots: the empty, single-seed and multi-seed cases, families, markers, floor."""
import pandas as pd
import pytest

from sparsebench.report.plots import _short, pareto_front, plot
from sparsebench.report.runs import family_of, runs_frame, summarize

from conftest import make_record


def board(records):
    return summarize(runs_frame(records))


def _compacted(record):
    import dataclasses

    return dataclasses.replace(record, macs=dataclasses.replace(record.macs, effective_is="realized"))


def _records(seeds):
    out = [make_record("dense", s, 0.90, target=None, kind="none") for s in seeds]
    for s in seeds:
        out += [make_record("gmp", s, 0.86 + 0.01 * s, target=0.5), make_record("gmp", s, 0.80 + 0.01 * s, target=0.9),
                make_record("random", s, 0.20, target=0.9),
                _compacted(make_record("l1-channel", s, 0.85, target=0.5, kind="flops", realizable=True,
                                       speedup=1.6 + 0.1 * s, granularity="channel"))]
    return out


def test_empty_records_draw_a_message_not_an_error(tmp_path):
    for x in ("macs", "speedup"):
        path = plot(pd.DataFrame(), tmp_path / f"{x}.png", x=x, formats=("svg",))
        assert path.stat().st_size > 5_000
        assert "nothing to draw" in (tmp_path / f"{x}.svg").read_text()


def test_single_seed_has_no_accuracy_interval_and_names_what_the_floor_leaves_out(tmp_path):
    summary = board(_records([0]))
    assert summary["top1_ci"].isna().all()
    plot(summary, tmp_path / "macs.png", x="macs", formats=("svg",))
    svg = (tmp_path / "macs.svg").read_text()
    # the random run at 20 % sits far below the front: it is named, not silently cut
    assert "not shown" in svg and "random" in svg
    assert "dense reference" in svg and "masked (theoretical MACs)" in svg and "compacted (real MACs)" in svg


def test_multi_seed_error_bars_and_speedup_panel(tmp_path):
    summary = board(_records([0, 1, 2]))
    gmp = summary[(summary["method"] == "gmp") & (summary["target"] == 0.5)].iloc[0]
    assert gmp["seeds"] == 3 and gmp["top1_ci"] > 0
    l1 = summary[summary["method"] == "l1-channel"].iloc[0]
    assert l1["speedup_lo"] < l1["measured_speedup"] < l1["speedup_hi"]
    for x in ("macs", "speedup"):
        assert plot(summary, tmp_path / f"{x}.png", x=x).stat().st_size > 10_000


def test_speedup_panel_without_realizable_runs_says_why(tmp_path):
    summary = board([make_record("gmp", 0, 0.8, target=0.5)])
    plot(summary, tmp_path / "s.png", x="speedup", formats=("svg",))
    assert "no realizable runs" in (tmp_path / "s.svg").read_text()


def test_families_and_labels():
    assert family_of("gap-2:4") == "dynamic sparse" and family_of("svite-plus") == "ViT methods"
    assert family_of("magnitude-layerwise[distribution=erk]") == "magnitude"
    assert family_of("dense-small") == "channel" and family_of("random") == "dense / baselines"
    assert _short("gmp[skip_first=False,skip_last=False]") == "gmp†"


def test_pareto_ties_keep_the_better_point():
    import numpy as np

    x = np.array([1.0, 1.0, 2.0])
    y = np.array([30.0, 90.0, 95.0])
    assert list(pareto_front(x, y, larger_x_better=False)) == [1, 2]


@pytest.mark.parametrize("seeds", [[0], [0, 1, 2]])
def test_leaderboard_aggregate_still_plots(tmp_path, seeds):
    from sparsebench.report.leaderboard import aggregate, records_frame

    agg = aggregate(records_frame(_records(seeds)))
    assert plot(agg, tmp_path / "a.png").stat().st_size > 10_000

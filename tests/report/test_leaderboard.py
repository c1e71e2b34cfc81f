import math

import pandas as pd
import pytest

from sparsebench.report.leaderboard import aggregate, ci95, records_frame, to_markdown
from sparsebench.report.plots import pareto_front, plot

from conftest import make_record


def fake_record(method, seed, top1, target=0.5, kind="sparsity", realizable=False, speedup=None, **kw):
    return make_record(method, seed, top1, target, kind, realizable, speedup, **kw)


def test_ci95_is_the_t_interval():
    values = pd.Series([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.3027; sd = 1; n = 3
    assert ci95(values) == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert math.isnan(ci95(pd.Series([1.0])))


def test_aggregate_means_over_seeds_per_target():
    records = [fake_record("random", s, t) for s, t in enumerate([0.80, 0.82, 0.84])]
    records += [fake_record("random", 0, 0.5, target=0.9)]
    agg = aggregate(records_frame(records))
    row = agg[(agg["method"] == "random") & (agg["target"] == 0.5)].iloc[0]
    assert row["seeds"] == 3 and row["top1"] == pytest.approx(82.0)
    assert row["delta"] == pytest.approx(-8.0)
    assert row["top1_ci"] == pytest.approx(4.302653 * 2.0 / math.sqrt(3), rel=1e-4)
    md = to_markdown(agg)
    assert "82.00 ± " in md and "not realizable" in md


def test_pareto_front():
    import numpy as np

    x = np.array([1.0, 2.0, 3.0, 4.0])
    y = np.array([50.0, 70.0, 60.0, 80.0])
    assert list(pareto_front(x, y, larger_x_better=False)) == [0, 1, 3]


def test_plots_are_written(tmp_path):
    records = [fake_record("l1-channel", s, 0.8 + 0.01 * s, kind="flops", realizable=True, speedup=1.5 + 0.1 * s)
               for s in range(3)]
    records += [fake_record("dense", 0, 0.9, target=None, kind="none", realizable=True, speedup=1.0)]
    agg = aggregate(records_frame(records))
    for x in ("macs", "speedup"):
        path = plot(agg, tmp_path / f"{x}.png", x=x)
        assert path.stat().st_size > 10_000


def test_missed_and_diverged_runs_are_listed_apart_and_left_out_of_the_means():
    from sparsebench.report.leaderboard import Leaderboard

    records = [fake_record("random", 0, 0.80), fake_record("random", 1, 0.90),
               fake_record("random", 2, 0.10, status="missed_target", achieved_sparsity=0.3),
               fake_record("random", 3, None, status="diverged")]
    board = Leaderboard.of(records)
    row = board.table.iloc[0]
    assert len(board.table) == 1 and row["seeds"] == 2 and row["top1"] == pytest.approx(85.0)
    assert sorted(board.excluded["status"]) == ["diverged", "missed_target"]
    md = to_markdown(board.table, left_out=board.excluded)
    assert "Left out of the means" in md and "achieved 0.3000, tolerance -0.005/+0.005" in md
    assert "non-finite training loss" in md


def test_cpu_and_gpu_records_are_never_averaged_together(tmp_path):
    records = [fake_record("l1-channel", s, 0.8, kind="flops", realizable=True, speedup=1.5, device="cpu",
                           device_name="AMD EPYC") for s in range(2)]
    records += [fake_record("l1-channel", s, 0.8, kind="flops", realizable=True, speedup=3.0, device="cuda:0",
                            device_name="NVIDIA H200") for s in range(2)]
    agg = aggregate(records_frame(records))
    assert sorted(agg["device"]) == ["cpu: AMD EPYC", "cuda: NVIDIA H200"]
    assert sorted(agg["measured_speedup"]) == [1.5, 3.0]
    md = to_markdown(agg)
    assert "cpu: AMD EPYC" in md and "cuda: NVIDIA H200" in md
    assert plot(agg, tmp_path / "s.png", x="speedup").stat().st_size > 10_000


def test_leaderboard_and_plot_commands_survive_odd_entries(tmp_path, capsys):
    from sparsebench.cli import main
    from sparsebench.store import RecordStore

    store = RecordStore(tmp_path)
    for s in range(2):
        store.write(fake_record("l1-channel", s, 0.8 + 0.01 * s, kind="flops", realizable=True, speedup=1.5))
    (tmp_path / "records" / "empty.json").write_text("")
    (tmp_path / "records" / "dir.json").mkdir()
    assert main(["leaderboard", str(tmp_path)]) == 0
    assert "l1-channel" in capsys.readouterr().out
    assert main(["plot", str(tmp_path), "--output", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "p.png").stat().st_size > 10_000
def test_method_label_ignores_tuple_defaults_read_back_from_json():
    from sparsebench.methods import config_dict, create_method
    from sparsebench.report.leaderboard import method_label

    args = {k: list(v) if isinstance(v, tuple) else v for k, v in config_dict(create_method("pass").config).items()}
    assert method_label(make_record("pass", spec={"method_args": args})) == "pass"
    args["residual_mode"] = "coupled"
    assert method_label(make_record("pass", spec={"method_args": args})) == "pass[residual_mode=coupled]"


def test_a_run_whose_dense_pretrain_diverged_is_listed_apart_and_the_site_builds(tmp_path):
    from sparsebench.report.leaderboard import Leaderboard
    from sparsebench.report.site import build_site

    records = [fake_record("random", 0, 0.8), fake_record("random", 1, None, status="diverged", dense_test_top1=None,
                                                         dense_val_top1=None)]
    board = Leaderboard.of(records)
    assert len(board.table) == 1 and list(board.excluded["status"]) == ["diverged"]
    build_site(records, tmp_path / "site")
    assert (tmp_path / "site" / "index.html").exists()


def test_mechanism_verdicts_rank_and_pair_with_their_null_control(monkeypatch):
    """A run whose mechanism did not act is left out of the means and listed apart; a seed-method
    row carries its paired difference to its own null control over the seeds both have."""
    from sparsebench.methods import METHODS
    from sparsebench.report.leaderboard import Leaderboard
    from sparsebench.store import Mechanism

    monkeypatch.setattr(METHODS.get("rigl").factory, "null_control", {"update_topology": False})
    acted = Mechanism(declared=True, acted=True, reason="acted: swapped = 40 (>= 1)")
    idle = Mechanism(declared=True, acted=False, reason="did not act: swapped = 0 (needs >= 1)")
    control = Mechanism(declared=True, acted=False, reason="null control", control=True)
    off = {"method_args": {"update_topology": False}}
    records = [fake_record("rigl", s, t, mechanism=acted) for s, t in enumerate([0.80, 0.84, 0.82])]
    records += [fake_record("rigl", 3, 0.95, mechanism=idle)]
    records += [fake_record("rigl", s, t, mechanism=control, spec=off, run_id=f"ctl-{s}")
                for s, t in enumerate([0.78, 0.80, 0.80, 0.50])]
    records += [fake_record("random", s, 0.7, mechanism=None) for s in range(2)]
    board = Leaderboard.of(records)
    rows = board.table.set_index("method")
    method, ctl = rows.loc["rigl"], rows.loc["rigl[update_topology=False]"]
    assert method["seeds"] == 3 and method["top1"] == pytest.approx(82.0)     # seed 3 did not act: left out
    assert method["mechanism"] == "acted" and ctl["mechanism"] == "control"
    assert method["control_pairs"] == 3                                        # seed 3's control has no partner
    assert method["control_delta"] == pytest.approx((2 + 4 + 2) / 3)
    assert method["control_delta_ci"] == pytest.approx(ci95(pd.Series([2.0, 4.0, 2.0])))
    assert ctl["control_pairs"] == 0 and rows.loc["random"]["mechanism"] == "not recorded"
    left = board.excluded
    assert list(left["status"]) == ["mechanism did not act"] and "swapped = 0" in left.iloc[0]["detail"]
    md = to_markdown(board.table, left_out=board.excluded)
    assert "+2.67 ± " in md and "(n=3; p " in md and "mechanism did not act" in md


def test_a_method_whose_steps_run_side_by_side_is_labelled_with_its_compute():
    from sparsebench.report.leaderboard import method_label

    wide = fake_record("gap-parallel", 0, 0.8, notes={"total_steps": 240, "sequential_steps": 60})
    deep = fake_record("gap-cyclic", 0, 0.8, notes={"total_steps": 240, "sequential_steps": 240})
    assert method_label(wide) == "gap-parallel (4× compute)" and method_label(deep) == "gap-cyclic"
    assert method_label(fake_record("random", 0, 0.8)) == "random"


def test_equal_cost_views_rank_only_rows_that_spent_as_much():
    """Two scratch methods at 100 steps, one at 2× (200 steps), and a pruning method whose result
    needed the 100-step dense pretrain plus 20 fine-tune steps: at equal steps the 2× row is its
    own group; at equal MACs the 2× sparse row joins the dense-training row that spent as much."""
    from sparsebench.report.leaderboard import Leaderboard, with_cost_groups
    from sparsebench.store.record import Cost

    def cost(steps, macs, pretrain=0, pretrain_macs=0.0):
        part = lambda m: {"forward": m / 3, "backward": 2 * m / 3, "complete": True}
        return Cost(method_steps=steps, method_budget_steps=steps, method_wall_seconds=1.0, finetune_steps=0,
                    finetune_wall_seconds=0.0, dense_pretrain_steps=pretrain, dense_pretrain_wall_seconds=1.0,
                    train_macs={"method": part(macs), "finetune": part(0.0), "dense_pretrain": part(pretrain_macs)})

    records = []
    jitter = {"rigl": (0.0, 0.002, -0.001), "set": (0.001, -0.002, 0.0), "rigl2x": (-0.001, 0.0, 0.002),
              "gmp": (0.002, -0.001, 0.0)}      # per-seed differences that are not all equal (a t-test exists)
    for seed in range(3):
        records += [
            fake_record("rigl", seed, 0.80 + 0.01 * seed + jitter["rigl"][seed], starts_from="scratch",
                        cost=cost(100, 1e9)),
            fake_record("set", seed, 0.70 + 0.01 * seed + jitter["set"][seed], starts_from="scratch",
                        cost=cost(100, 1.05e9)),
            fake_record("rigl2x", seed, 0.85 + 0.01 * seed + jitter["rigl2x"][seed], starts_from="scratch",
                        cost=cost(200, 2e9)),
            fake_record("gmp", seed, 0.90 + 0.01 * seed + jitter["gmp"][seed], starts_from="scratch",
                        cost=cost(100, 2.1e9)),
        ]
    steps = Leaderboard.of(records, equal_cost="steps").table.set_index("method")
    assert steps.loc["rigl2x", "cost_group"] != steps.loc["rigl", "cost_group"] == steps.loc["gmp", "cost_group"]
    assert steps.loc["rigl2x", "rank"] == "1" and steps.loc["gmp", "rank"] == "1"     # each the best of its group
    macs = Leaderboard.of(records, equal_cost="macs").table.set_index("method")
    assert macs.loc["rigl", "cost_group"] == macs.loc["set", "cost_group"] == "≈1.0 train GMACs"
    assert macs.loc["rigl2x", "cost_group"] == macs.loc["gmp", "cost_group"] == "≈2.0 train GMACs"
    assert macs.loc["rigl", "rank"] == "1" and macs.loc["gmp", "rank"] == "1"
    assert macs.loc["rigl2x", "rank"] == "2"                 # separated from gmp by about 5 points on every seed
    assert "| cost " in to_markdown(Leaderboard.of(records, equal_cost="macs").table)
    # a method starting from the dense checkpoint is charged the pretrain its result needed
    pruned = [fake_record("magnitude", s, 0.8, starts_from="pretrained", cost=cost(0, 0.0, 100, 3e9)) for s in range(2)]
    frame = with_cost_groups(records_frame(pruned + records), "macs")
    assert set(frame[frame["method"] == "magnitude"]["cost_group"]) == {"≈3.0 train GMACs"}
    with pytest.raises(ValueError, match="unknown equal-cost view 'flops'"):
        with_cost_groups(frame, "flops")


def test_measured_speedup_names_the_sparse_kernel_realization(tmp_path):
    """Masked runs realized by auto show their speedup with the realization named; a row whose
    layers all stayed dense says so; compacted rows are unchanged. The site and the run pages too."""
    from sparsebench.report.runs import runs_frame, summarize
    from sparsebench.report.site import build_site
    from sparsebench.store.record import Realization

    layers = [{"layer": "fc", "type": "Linear", "shape": [4, 8], "density": 0.1, "kernel": "csr",
               "dense_ms": 0.2, "csr_ms": 0.05, "reason": None}]
    auto = Realization(True, "auto", None, "float32", {"sparse_layers": 1, "layers": layers})
    all_dense = Realization(True, "auto", None, "float32", {"sparse_layers": 0, "layers": []})
    records = [fake_record("magnitude-global", s, 0.8, target=0.9, realizable=True, speedup=1.4, realization=auto)
               for s in range(2)]
    records += [fake_record("random", 0, 0.7, target=0.9, realizable=True, speedup=1.0, realization=all_dense)]
    records += [fake_record("l1-channel", 0, 0.8, kind="flops", realizable=True, speedup=1.5)]
    md = to_markdown(aggregate(records_frame(records)))
    assert "1.40 ± 0.00× (auto, eager)" in md and "1.00× (auto: all dense, eager)" in md and "1.50×" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert not any("(compacted)" in line or "not realizable" in line for line in table)
    summary = summarize(runs_frame(records))
    assert set(summary["realization"].dropna()) == {"auto, eager", "auto: all dense, eager"}
    build_site(records, tmp_path / "site", svg=False)
    index = (tmp_path / "site" / "index.html").read_text()
    assert "1.40× [" in index and "(auto, eager)" in index
    page = (tmp_path / "site" / "runs" / "magnitude-global-0-0.9-cpu.html").read_text()
    assert "per-layer kernels" in page and "fc (4, 8): csr, density 0.100, dense 0.2 ms, CSR 0.05 ms" in page
    entries = page.split('id="latency"')[1].split("</table>")[0]      # every entry, the one shown marked
    assert entries.count("<tr") == 2 and '<tr class="shown">' in entries and "1.400× ◀" in entries
    assert "auto (1 layers on CSR)" in entries


def test_a_row_timed_on_some_seeds_shows_their_speedup_and_says_how_many():
    """Seeds without a saved model cannot be re-timed: the row's speedup is the mean over the seeds
    that have one, and says "k of n seeds timed" instead of calling the row not realizable."""
    from sparsebench.store.record import Realization

    auto = Realization(True, "auto", None, "float32", {"sparse_layers": 2, "layers": []})
    records = [fake_record("rigl", 0, 0.8, target=0.9, realizable=True, speedup=1.3, realization=auto)]
    records += [fake_record("rigl", s, 0.8, target=0.9) for s in (1, 2)]       # not realizable when run
    md = to_markdown(aggregate(records_frame(records)))
    assert "1.30× (auto, eager; 1 of 3 seeds timed)" in md
    md = to_markdown(aggregate(records_frame(records[1:])))
    assert "not realizable" in md


def test_no_measured_latency_means_no_kernel_plot(tmp_path):
    """Records without any latency entry (latency off, or failed runs) give no plot and no error."""
    from sparsebench.report.speedup import entries_frame, plot_measured_vs_theoretical

    records = [fake_record("random", 0, 0.8), fake_record("random", 1, 0.8, status="diverged")]
    assert entries_frame(records).empty
    assert plot_measured_vs_theoretical(entries_frame(records), tmp_path / "p.png") is None
    assert not (tmp_path / "p.png").exists()


def test_a_starved_run_is_footnoted_under_the_leaderboard():
    from conftest import make_record
    from sparsebench.report.leaderboard import Leaderboard, to_markdown

    used = {"stages": {"method": {"loader_wait_fraction": 0.4}, "finetune": {"loader_wait_fraction": 0.05}}}
    calm = {"stages": {"method": {"loader_wait_fraction": 0.1}}}
    records = [make_record("rigl", seed=0, resources=used), make_record("rigl", seed=1, resources=calm),
               make_record("gmp", seed=0)]
    board = Leaderboard.of(records)
    text = to_markdown(board.table, left_out=board.excluded)
    [line] = [line for line in text.splitlines() if line.startswith("Starved runs")]
    assert "rigl on" in line and "sparsity=0.5 (1 of 2 seeds)" in line and "gmp" not in line
    plain = to_markdown(Leaderboard.of(records[2:]).table)
    assert "Starved" not in plain


def test_delta_signal_pairs_a_method_with_its_signal_control_and_says_which_controls_it_beat():
    """C-GaP against its random prune-back (the same method, a Config switch) and its null control;
    RigL against SET (the random-growth control another method is); a method without signal-control
    runs shows "–". Every Δ control and Δ signal test of the table is Holm-adjusted together."""
    from sparsebench.report.leaderboard import Leaderboard, display_table
    from sparsebench.store import Mechanism

    acted = Mechanism(declared=True, acted=True, reason="acted")
    signal = Mechanism(declared=True, acted=True, reason="signal control", signal_control="random prune-back")
    control = Mechanism(declared=True, acted=False, reason="null control", control=True)
    gap, rigl = [0.80, 0.84, 0.82, 0.86], [0.70, 0.71, 0.69, 0.72]
    records = [fake_record("gap-cyclic", s, t, mechanism=acted) for s, t in enumerate(gap)]
    records += [fake_record("gap-cyclic", s, t - d, mechanism=signal, run_id=f"sig-{s}",
                            spec={"method_args": {"prune_scores": "random"}})
                for s, (t, d) in enumerate(zip(gap, [0.05, 0.06, 0.05, 0.07]))]
    records += [fake_record("gap-cyclic", s, t - d, mechanism=control, run_id=f"ctl-{s}",
                            spec={"method_args": {"regrow": False}})
                for s, (t, d) in enumerate(zip(gap, [0.01, -0.01, 0.02, 0.0]))]
    records += [fake_record("rigl", s, t, mechanism=acted) for s, t in enumerate(rigl)]
    records += [fake_record("set", s, t + 0.01, mechanism=acted) for s, t in enumerate(rigl[:3])]
    records += [fake_record("gmp", s, 0.75, mechanism=acted) for s in range(3)]
    board = Leaderboard.of(records)
    rows = board.table.set_index("method")
    g = rows.loc["gap-cyclic"]
    assert g["signal"] == "gap-cyclic[prune_scores=random]" and g["signal_pairs"] == 4
    assert g["signal_delta"] == pytest.approx(100 * (0.05 + 0.06 + 0.05 + 0.07) / 4)
    assert rows.loc["gap-cyclic[prune_scores=random]"]["mechanism"] == "signal control"
    assert rows.loc["gap-cyclic[prune_scores=random]"]["signal_pairs"] == 0     # a control is not paired itself
    r = rows.loc["rigl"]
    assert r["signal"] == "set" and r["signal_pairs"] == 3 and r["signal_delta"] == pytest.approx(-1.0)
    assert rows.loc["gmp"]["signal_pairs"] == 0
    from sparsebench.report.stats import holm

    raw = [g["control_p"], g["signal_p"], r["signal_p"]]                        # the table's three tests
    assert not any(math.isnan(p) for p in raw) and all(math.isnan(p) for p in board.table["baseline_p"])
    assert [g["control_p_holm"], g["signal_p_holm"], r["signal_p_holm"]] == pytest.approx(holm(raw))
    shown = display_table(board.table).set_index("method")
    assert shown.loc["gap-cyclic", "Δ signal"].startswith("+5.75 ± ")
    assert "vs gap-cyclic[prune_scores=random] (n=4" in shown.loc["gap-cyclic", "Δ signal"]
    assert shown.loc["gap-cyclic", "verdict"] == "beats signal control only"
    assert shown.loc["rigl", "verdict"] == "does not beat signal control (null control not run)"
    assert shown.loc["gmp", "Δ signal"] == "–" and shown.loc["gmp", "verdict"] == "–"


def test_controls_verdict_names_the_controls_a_row_beat():
    from sparsebench.report.leaderboard import controls_verdict

    def row(null=None, signal=None):
        out = {}
        for prefix, (delta, p) in (("control", null), ("signal", signal)):
            if delta is not None:
                out.update({f"{prefix}_pairs": 5, f"{prefix}_delta": delta, f"{prefix}_p": p, f"{prefix}_p_holm": p})
        return out

    none = (None, None)
    assert controls_verdict(row((2.0, 0.01), (1.5, 0.02))) == "beats null and signal control"
    assert controls_verdict(row((2.0, 0.01), (1.5, 0.20))) == "beats null control only"
    assert controls_verdict(row((-2.0, 0.01), (-1.5, 0.01))) == "beats neither control; below null and signal control"
    assert controls_verdict(row((-2.0, 0.01), (-1.5, 0.20))) == "beats neither control; below null control"
    assert controls_verdict(row((-2.0, 0.20), (-1.5, 0.20))) == "beats neither control"
    assert controls_verdict(row((2.0, 0.01), none)) == "beats null control (signal control not run)"
    assert controls_verdict(row(none, none)) == "–"
    # a signal control paired with the method's null control gets no verdict of its own
    assert controls_verdict({**row((2.0, 0.01), none), "mechanism": "signal control"}) == "–"


def test_runs_of_one_label_under_two_recipes_are_two_rows_each_with_its_own_control():
    """PASS searched for 2 and for 6 epochs at one target shares its label; the rows say which
    recipe, each pairs with the null control of its own recipe, and the signal control run only
    at 2 epochs pairs with the 2-epoch row alone."""
    from sparsebench.report.leaderboard import Leaderboard
    from sparsebench.store import Mechanism

    acted = Mechanism(declared=True, acted=True, reason="acted")
    control = Mechanism(declared=True, acted=False, reason="null control", control=True)
    signal = Mechanism(declared=True, acted=True, reason="signal control", signal_control="shuffled labels")
    records = []
    for epochs, top1, off in ((2, 0.80, 0.02), (6, 0.90, -0.01)):
        recipe = {"search_epochs": epochs, "lr": 0.05}
        records += [fake_record("gap-cyclic", s, top1 + 0.01 * s, mechanism=acted, run_id=f"m{epochs}-{s}",
                                spec={"method_args": {}, "recipe": recipe}) for s in range(4)]
        records += [fake_record("gap-cyclic", s, top1 + 0.01 * s - off, mechanism=control, run_id=f"c{epochs}-{s}",
                                spec={"method_args": {"regrow": False}, "recipe": recipe}) for s in range(4)]
    records += [fake_record("gap-cyclic", s, 0.70, mechanism=signal, run_id=f"s-{s}",
                            spec={"method_args": {"prune_scores": "random"}, "recipe": {"search_epochs": 2, "lr": 0.05}})
                for s in range(4)]
    rows = Leaderboard.of(records).table.set_index("method")
    two, six = rows.loc["gap-cyclic {search_epochs=2}"], rows.loc["gap-cyclic {search_epochs=6}"]
    assert two["seeds"] == six["seeds"] == 4
    assert two["top1"] == pytest.approx(81.5) and six["top1"] == pytest.approx(91.5)
    assert two["control_delta"] == pytest.approx(2.0) and six["control_delta"] == pytest.approx(-1.0)
    assert two["signal_pairs"] == 4 and six["signal_pairs"] == 0
    assert "gap-cyclic[prune_scores=random]" in rows.index          # no collision: its label stays plain


def test_every_signal_control_that_ran_is_paired_tested_in_the_family_and_named_in_the_verdict():
    """PASS declares three signal controls (shuffled labels, the two sanity checks): the Δ signal cell
    pairs the row with each one that ran, all in one Holm family, and the verdict names a control
    beyond the first that the row fell below."""
    from sparsebench.report.leaderboard import Leaderboard, display_table, table_csv
    from sparsebench.report.stats import holm
    from sparsebench.store import Mechanism

    acted = Mechanism(declared=True, acted=True, reason="acted")
    signal = lambda name: Mechanism(declared=True, acted=True, reason="signal", signal_control=name)  # noqa: E731
    top = [0.80, 0.84, 0.82, 0.86]
    records = [fake_record("pass", s, t, mechanism=acted, target=0.5, kind="flops") for s, t in enumerate(top)]
    records += [fake_record("pass", s, t - d, mechanism=signal("shuffled labels"), target=0.5, kind="flops",
                            run_id=f"sh-{s}", spec={"method_args": {"labels": "shuffled"}})
                for s, (t, d) in enumerate(zip(top, [0.01, -0.01, 0.02, 0.0]))]
    records += [fake_record("pass", s, t + d, mechanism=signal("re-initialised structure"), target=0.5, kind="flops",
                            run_id=f"re-{s}", spec={"method_args": {"sanity": "reinit"}})
                for s, (t, d) in enumerate(zip(top, [0.05, 0.06, 0.05, 0.07]))]
    board = Leaderboard.of(records)
    row = board.table.set_index("method").loc["pass"]
    assert row["signal"] == "pass[labels=shuffled]" and row["signal_pairs"] == 4
    (more,) = row["signal_more"]
    assert more["label"] == "pass[sanity=reinit]" and more["more_pairs"] == 4
    assert more["more_delta"] == pytest.approx(-100 * (0.05 + 0.06 + 0.05 + 0.07) / 4)
    assert [row["signal_p_holm"], more["more_p_holm"]] == pytest.approx(holm([row["signal_p"], more["more_p"]]))
    shown = display_table(board.table).set_index("method").loc["pass"]
    assert "vs pass[labels=shuffled]" in shown["Δ signal"] and "; -5.75 ± " in shown["Δ signal"]
    assert shown["verdict"].endswith("; below pass[sanity=reinit]")
    import io
    import json

    read = pd.read_csv(io.StringIO(table_csv(board.table))).set_index("method")
    assert json.loads(read.loc["pass", "signal_more"])[0]["label"] == "pass[sanity=reinit]"

"""`sweep --dry-run` cost: device-hours per suite and per method, from measured step costs where
records of the model exist, else from MACs at the stated throughput."""
from pathlib import Path

import pytest

from sparsebench.runners.cost import cost_report, suite_cost
from sparsebench.runners.suite import estimate_cost, load_suite

ROOT = Path(__file__).resolve().parents[2]
SEED_METHODS = {"pass", "gap-cyclic", "gap-parallel", "rigl", "set", "svite", "s2vite", "svite-plus", "ofb"}


def base_names(cost):
    return {label.split("[", 1)[0] for label in cost.per_method()}


def test_without_records_the_cost_is_macs_at_the_stated_throughput():
    suite = load_suite(ROOT / "benchmarks" / "papers" / "gap.yaml")
    cost = suite_cost(suite.name, suite.specs, [], assume_tflops=20)
    assert cost.sources == {"resnet50": "MACs at 20 TFLOP/s"}
    spec = next(s for s in suite.specs if s.method == "rigl")
    c = estimate_cost(spec, 20)
    # a scratch method: the dense-pretrain budget plus the fine-tune, at 6 x MACs x batch FLOPs per step
    steps = c["steps"]["pretrain"] + c["steps"]["finetune"]
    rigl = cost.per_pair[("rigl", "resnet50")]
    assert rigl.runs == 2
    assert rigl.seconds == pytest.approx(2 * steps * 6 * c["macs"] * 1024 / 20e12, rel=1e-3)
    assert cost.dense_seconds == pytest.approx(c["steps"]["pretrain"] * 6 * c["macs"] * 1024 / 20e12, rel=1e-6)
    text = cost_report(cost)
    assert "device-hours by method" in text and f"suite paper-gap: 11 runs" in text


def test_measured_step_costs_replace_the_macs_estimate():
    from sparsebench.store import load_records

    suite = load_suite(ROOT / "benchmarks" / "quick.yaml")
    records = load_records(ROOT / "results" / "quick")
    measured = suite_cost(suite.name, suite.specs, records, assume_tflops=0.02)
    guessed = suite_cost(suite.name, suite.specs, [], assume_tflops=0.02)
    assert all(s.startswith("measured step costs") for s in measured.sources.values())
    assert all(s.startswith("MACs at") for s in guessed.sources.values())
    # the quick suite took 424 s of sweep time on the reference machine: the measured prediction is near it
    assert 200 < measured.total_seconds < 900
    assert measured.total_seconds != pytest.approx(guessed.total_seconds, rel=0.05)


def test_the_cifar_suite_costs_every_seed_method_and_its_control():
    suite = load_suite(ROOT / "benchmarks" / "cifar.yaml")
    cost = suite_cost(suite.name, suite.specs, [], assume_tflops=20)
    assert SEED_METHODS <= base_names(cost)
    controls = [label for label in cost.per_method() if "search=False" in label or "topology_updates=False" in label
                or "regrow=False" in label or "token_selection=fixed_random" in label]
    assert {label.split("[", 1)[0] for label in controls} == SEED_METHODS      # every seed method's control
    assert sum(line.runs for line in cost.per_method().values()) == len(suite.specs)


def test_the_transfer_suite_lists_its_seed_methods_with_controls():
    suite = load_suite(ROOT / "benchmarks" / "transfer.yaml")
    names = {(s.method, dict(s.method_args).get("search", dict(s.method_args).get("topology_updates"))) for s in suite.specs}
    for method in ("pass", "ofb"):
        assert (method, None) in names and (method, False) in names
    for method in ("s2vite", "svite"):
        assert (method, None) in names and (method, False) in names

"""End-to-end protocol runs on digits with a seconds-scale recipe."""
import json

import pytest

from sparsebench.runners.pipeline import RunOptions, execute, resolve
from sparsebench.methods import METHODS, Method, Outcome, register_method
from sparsebench.store.records import RecordStore

from conftest import tiny_spec


def test_record_has_headline_fields_and_masks_survive_finetune(tmp_path):
    spec = tiny_spec("magnitude-layerwise", target="sparsity=0.8")
    record = execute(spec, RunOptions(out=tmp_path))
    stored = json.loads(RecordStore(tmp_path).path(resolve(spec).run_id).read_text())
    assert stored == json.loads(record.to_json())
    assert RecordStore(tmp_path).read(record.run_id) == record
    for key in ("achieved_sparsity", "achieved_flops_ratio", "test_top1", "dense_test_top1", "macs", "params",
                "latency", "cost", "environment", "code_version", "spec", "target", "realization", "status",
                "target_met", "tolerance", "prunable"):
        assert key in stored
    assert record.status == "ok" and record.target_met and stored["tolerance"] == {"below": 0.005, "above": 0.005}
    # the fine-tune ran with masks held: the achieved sparsity is still the target
    assert record.cost.finetune_steps > 0
    assert record.achieved_sparsity == pytest.approx(0.8, abs=0.01)
    assert stored["target"] == {"kind": "sparsity", "value": 0.8}
    # unstructured masks: timed through the auto realizer, its per-layer choices in the record
    assert record.realization.realizable and record.realization.kind == "auto" and record.measured_speedup > 0
    calibration = stored["realization"]["calibration"]
    assert calibration["batch"] == 8 and calibration["threads"] == record.spec["measure"]["threads"]
    layers = stored["realization"]["layers"]
    assert layers and {e["kernel"] for e in layers} <= {"dense", "csr"}
    assert stored["realization"]["sparse_layers"] == sum(e["kernel"] == "csr" for e in layers)
    # batch 1 is timed with kernels chosen at batch 1, the throughput batch with the record's realization
    at_1 = record.latency["1"]["realization"]
    assert at_1["calibrated_at_batch"] == 1 and at_1["layers"]
    assert record.latency["8"]["realization"]["calibrated_at_batch"] == 8
    assert record.macs.effective < record.macs.dense
    assert record.selection["split"] == "val" and record.selection["test_evaluations"] == 1
    assert record.data["n_val"] > 0 and record.data["split_seed"] == 0
    # a baseline declares no mechanism; the fine-tune's curve is recorded, one loss point per step or bin
    assert record.mechanism.label == "none" and record.mechanism.acted is None
    finetune = record.curves["finetune"]
    assert sum(1 for _ in finetune["step"]) * finetune["steps_per_point"] >= record.cost.finetune_steps
    assert finetune["val"] and "method" not in record.curves          # a one-shot prune trains nothing
    # each test sample's correctness, keyed to the test set: its mean is the record's top-1
    hits = record.per_sample.vector()
    assert len(hits) == record.test_samples == record.per_sample.test_set["n"]
    assert hits.mean() == pytest.approx(record.test_top1)
    assert record.per_sample.test_set["dataset"] == "digits" and len(record.per_sample.test_set["labels_sha256"]) == 64


def test_structured_record_is_realized_and_timed(tmp_path):
    record = execute(tiny_spec("l1-channel", target="flops=0.5"), RunOptions(out=tmp_path))
    assert record.to_dict()["realization"] == {"realizable": True, "kind": "compacted", "reason": None,
                                               "dtype": "float32"}
    assert 0.49 <= record.achieved_flops_ratio <= 0.5
    assert record.theoretical_speedup == pytest.approx(1 / record.achieved_flops_ratio)
    for batch in ("1", "8"):
        timing = record.latency[batch]
        assert timing["dense_ms"] > 0 and timing["realized_ms"] > 0
        assert timing["measured_speedup"] == pytest.approx(timing["dense_ms"] / timing["realized_ms"])
    assert record.measured_speedup == record.latency["8"]["measured_speedup"]


def test_same_seed_gives_same_metrics(tmp_path):
    spec = tiny_spec("random", target="sparsity=0.5", seed=3)
    a = execute(spec, RunOptions(out=tmp_path / "a"))
    b = execute(spec, RunOptions(out=tmp_path / "b"))
    for key in ("test_top1", "val_top1", "achieved_sparsity", "achieved_flops_ratio", "dense_test_top1"):
        assert getattr(a, key) == getattr(b, key)
    assert a.run_id == b.run_id


def test_a_cached_dense_checkpoint_changes_nothing_downstream(tmp_path):
    """Resume determinism: the run that trained the dense model and a re-run that loads it agree."""
    spec = tiny_spec("magnitude-layerwise", target="sparsity=0.7", seed=1)
    first = execute(spec, RunOptions(out=tmp_path / "a"))
    again = execute(spec, RunOptions(out=tmp_path / "b", cache_dir=tmp_path / "a" / "checkpoints"))
    assert not (tmp_path / "b" / "checkpoints").exists()
    for key in ("test_top1", "val_top1", "achieved_sparsity", "dense_test_top1"):
        assert getattr(first, key) == getattr(again, key)


def test_methods_share_one_dense_checkpoint(tmp_path):
    a = execute(tiny_spec("magnitude-global"), RunOptions(out=tmp_path))
    b = execute(tiny_spec("l1-channel", target="flops=0.5"), RunOptions(out=tmp_path))
    assert a.dense_checkpoint == b.dense_checkpoint
    assert len(list((tmp_path / "checkpoints").glob("dense-*.pt"))) == 1


def test_a_crashed_run_leaves_no_partial_record(tmp_path):
    @register_method("test-crash")
    class Crash(Method):
        granularity = "unstructured"

        def run(self, ctx):
            ctx.make_trainer().fit(2)
            raise RuntimeError("boom")

    try:
        with pytest.raises(RuntimeError, match="boom"):
            execute(tiny_spec("test-crash"), RunOptions(out=tmp_path))
        records = tmp_path / "records"
        assert not records.exists() or not any(records.iterdir())
    finally:
        METHODS._entries.pop("test-crash")


def test_a_method_that_declares_a_mechanism_but_reports_none_did_not_act(tmp_path):
    from sparsebench.methods.baselines import MagnitudeGlobal

    @register_method("test-silent")
    class Silent(MagnitudeGlobal):
        null_control = {"skip_first": False}

    try:
        record = execute(tiny_spec("test-silent"), RunOptions(out=tmp_path))
    finally:
        METHODS._entries.pop("test-silent")
    assert record.mechanism.declared and record.mechanism.acted is False and not record.mechanism_acted
    assert "reported no telemetry" in record.mechanism.reason


def test_budget_overrun_is_an_error_not_a_record(tmp_path):
    @register_method("test-greedy")
    class Greedy(Method):
        granularity = "unstructured"

        def run(self, ctx):
            ctx.make_trainer().fit(ctx.budget.limit + 1)
            return Outcome(ctx.model, "masked")

    try:
        from sparsebench.training.trainer import BudgetExceeded

        with pytest.raises(BudgetExceeded):
            execute(tiny_spec("test-greedy"), RunOptions(out=tmp_path))
        assert not (tmp_path / "records").exists() or not any((tmp_path / "records").iterdir())
    finally:
        METHODS._entries.pop("test-greedy")


def test_scratch_methods_get_the_pretrain_budget(tmp_path):
    record = execute(tiny_spec("gmp", target="sparsity=0.5"), RunOptions(out=tmp_path))
    assert record.starts_from == "scratch"
    assert record.cost.method_steps == record.cost.dense_pretrain_steps
    assert record.cost.finetune_steps > 0


def test_gmp_from_pretrained_prunes_the_dense_checkpoint_within_the_search_budget(tmp_path):
    spec = tiny_spec("gmp", target="sparsity=0.6", method_args=(("from_pretrained", True),))
    record = execute(spec, RunOptions(out=tmp_path))
    assert record.starts_from == "pretrained"
    assert record.cost.method_steps == record.cost.method_budget_steps < record.cost.dense_pretrain_steps
    assert record.achieved_sparsity == pytest.approx(0.6, abs=0.01)

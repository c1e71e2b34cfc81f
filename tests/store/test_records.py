import json

import pytest

import logging

from sparsebench.store import SCHEMA_VERSION, RecordError, RecordStore, RunRecord, Tolerance, atomic_write_text, target_check

from conftest import make_record


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    import os

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(tmp_path / "r.json", "{}")
    assert list(tmp_path.iterdir()) == []


def test_store_round_trip_and_exists(tmp_path):
    store = RecordStore(tmp_path)
    record = make_record(run_id="x__y")
    assert not store.exists("x__y")
    store.write(record)
    assert store.exists("x__y") and store.read("x__y") == record
    assert store.load_all() == [record]
    stored = json.loads((tmp_path / "records" / "x__y.json").read_text())
    assert stored["schema"] == SCHEMA_VERSION and stored["status"] == "ok" and stored["target_met"] is True
    assert stored["target"] == {"kind": "sparsity", "value": 0.5}
    assert stored["tolerance"] == {"below": 0.005, "above": 0.005}


def test_odd_entries_are_skipped_with_one_warning_line_each(tmp_path, caplog):
    store = RecordStore(tmp_path)
    good = make_record(run_id="good")
    store.write(good)
    records = tmp_path / "records"
    (records / "empty.json").write_text("")
    (records / "broken.json").write_text("{not json")
    (records / "list.json").write_text("[1, 2]")
    (records / "other.json").write_text(json.dumps({"schema": 99, "run_id": "other"}))
    missing = good.to_dict()
    del missing["cost"]
    (records / "missing.json").write_text(json.dumps(missing))
    (records / "dir.json").mkdir()
    with caplog.at_level(logging.WARNING, logger="sparsebench"):
        assert store.load_all() == [good]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 6 and all("\n" not in line for line in lines)
    reasons = {name: next(line for line in lines if f"{name}.json" in line)
               for name in ("empty", "broken", "list", "other", "missing", "dir")}
    assert "empty file" in reasons["empty"] and "not JSON" in reasons["broken"]
    assert "schema 99" in reasons["other"] and "missing field 'cost'" in reasons["missing"]
    assert "directory" in reasons["dir"] and "not a record object" in reasons["list"]
    with pytest.raises(RecordError, match="empty file"):
        store.read("empty")


def test_a_record_states_its_status_and_why():
    with pytest.raises(RecordError, match="status 'weird'"):
        make_record(status="weird")
    with pytest.raises(RecordError, match="no 'test_top1'"):
        make_record(test_top1=None)
    with pytest.raises(RecordError, match="without an 'error'"):
        make_record(status="diverged", error=None)
    diverged = make_record(status="diverged")
    assert not diverged.has_result and RunRecord.from_dict(diverged.to_dict()) == diverged


@pytest.mark.parametrize("kind, target, achieved, met", [
    ("sparsity", 0.9, 0.8951, True), ("sparsity", 0.9, 0.894, False), ("sparsity", 0.9, 0.906, False),
    ("flops", 0.5, 0.471, True), ("flops", 0.5, 0.469, False), ("flops", 0.5, 0.509, True),
    ("flops", 0.5, 0.511, False), ("flops", 0.5, float("nan"), False), ("none", None, None, True)])
def test_target_check_tolerances(kind, target, achieved, met):
    assert target_check(kind, target, achieved, achieved)[0] is met


def test_schema_1_records_are_upgraded_with_default_tolerances():
    v1 = make_record(achieved_flops_ratio=0.45, kind="flops").to_dict()
    for key in ("status", "target_met", "tolerance", "prunable", "plugin", "error"):
        v1.pop(key)
    v1["schema"] = 1
    upgraded = RunRecord.from_dict(v1)
    assert upgraded.status == "missed_target" and upgraded.target_met is False
    assert upgraded.tolerance == Tolerance(0.03, 0.01) and upgraded.prunable.policy == "unknown"


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_follow_the_umask(tmp_path, umask, mode):
    import os

    old = os.umask(umask)
    try:
        path = RecordStore(tmp_path).write(make_record(run_id="r"))
        atomic_write_text(tmp_path / "leaderboard.md", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert (tmp_path / "leaderboard.md").stat().st_mode & 0o777 == mode


def test_mechanism_and_curves_round_trip_and_schema_2_reads_as_not_recorded():
    from sparsebench.store import Mechanism

    mech = Mechanism(declared=True, acted=False, reason="did not act: moved = 0 (needs >= 1)",
                     metrics={"moved": 0, "per_phase": [0.1, 0.2]}, thresholds={"moved": [">=", 1]})
    curves = {"method": {"step": [1, 2], "loss": [2.3, 2.1], "lr": [0.1, 0.1], "steps_per_point": 1,
                         "val": [[2, 0.5]], "events": [[2, "update", {"swapped": 4}]]}}
    record = make_record(mechanism=mech, curves=curves)
    back = RunRecord.from_json(record.to_json())
    assert back == record and back.mechanism.label == "did not act" and not back.mechanism_acted
    v2 = make_record().to_dict()
    for key in ("mechanism", "curves"):
        v2.pop(key)
    v2["schema"] = 2
    upgraded = RunRecord.from_dict(v2)
    assert upgraded.schema == SCHEMA_VERSION == 3 and upgraded.mechanism is None and upgraded.curves is None
    assert upgraded.mechanism_acted and not upgraded.is_control


def test_per_sample_correctness_packs_small_and_pairs_only_on_the_same_test_set():
    import numpy as np

    from sparsebench.store import PerSample

    rng = np.random.default_rng(0)
    hits, labels = rng.random(10_000) < 0.9, rng.integers(0, 10, 10_000)
    a = PerSample.of(hits, labels, "cifar10", 0)
    assert len(a.correct) < 2000 and np.array_equal(a.vector(), hits)       # 10k samples: 1.7 KB
    record = make_record(per_sample=a)
    assert RunRecord.from_json(record.to_json()).per_sample == a
    assert a.unpairable_with(PerSample.of(~hits, labels, "cifar10", 0)) is None
    other_labels = labels.copy()
    other_labels[0] = (other_labels[0] + 1) % 10
    assert "labels_sha256" in a.unpairable_with(PerSample.of(hits, other_labels, "cifar10", 0))
    assert a.unpairable_with(PerSample.of(hits, labels, "cifar10", 1)) == "different test sets: split_seed 0 vs 1"


def test_a_declared_sparsity_pattern_round_trips_and_older_records_read_without_one():
    record = make_record(sparsity_pattern="2:4")
    assert RunRecord.from_json(record.to_json()) == record
    older = make_record().to_dict()
    older.pop("sparsity_pattern")
    assert RunRecord.from_dict(older).sparsity_pattern is None


def test_a_signal_control_round_trips_and_older_mechanisms_read_without_one():
    from sparsebench.store import Mechanism

    mech = Mechanism(declared=True, acted=False, reason="signal control 'shuffled labels' (labels=shuffled): ...",
                     signal_control="shuffled labels")
    record = make_record(mechanism=mech)
    back = RunRecord.from_json(record.to_json())
    assert back == record and back.is_signal_control and back.mechanism.label == "signal control"
    assert back.mechanism_acted and not back.is_control        # a control's number, whatever its telemetry
    older = record.to_dict()
    del older["mechanism"]["signal_control"]                     # written before signal controls existed
    old = RunRecord.from_dict(older)
    assert old.mechanism.signal_control is None and not old.is_signal_control and old.mechanism.label == "did not act"

"""Saved models: save -> load -> evaluate reproduces the record; exports match PyTorch; retime adds
device entries and nothing else; a corrupt or missing model is one line naming the run."""
import dataclasses
import json

import pytest
import torch

from conftest import tiny_spec
from sparsebench.cli import main
from sparsebench.errors import ArtifactError
from sparsebench.runners.artifacts import evaluate_loaded, load_artifact
from sparsebench.runners.pipeline import RunOptions, execute, resolve
from sparsebench.store import RecordStore

# one masked and one compacted run per granularity, where the granularity has both
RUNS = {
    "unstructured-masked": tiny_spec("magnitude-global", target="sparsity=0.7"),
    "channel-compacted": tiny_spec("l1-channel", target="flops=0.5"),
    "head-compacted": tiny_spec("s2vite", model="vit_cifar_tiny", target="flops=0.6"),
    "token-masked": tiny_spec("svite-plus", model="vit_cifar_tiny", target="sparsity=0.5",
                              method_args=(("token_keep", 0.8),)),
    "token-compacted": tiny_spec("svite-plus", model="vit_cifar_tiny", target="sparsity=0.5",
                                 method_args=(("token_keep", 0.8), ("token_mode", "drop"))),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    records = {name: execute(resolve(spec), RunOptions(out=out, save_model=True)) for name, spec in RUNS.items()}
    return out, records


def test_every_granularity_reloads_to_the_records_top1_exactly(results):
    out, records = results
    kinds = set()
    for name, record in records.items():
        assert record.artifact["path"] == f"models/{record.run_id}.safetensors", name
        loaded = load_artifact(record.run_id, out)
        kinds.add(loaded.realization)
        assert loaded.realization == name.split("-")[1], name
        assert evaluate_loaded(loaded).top1 == record.test_top1, name
        params = sum(p.numel() for p in loaded.model.parameters())
        nonzero = sum(int((p != 0).sum()) for p in loaded.model.parameters())
        assert (params, nonzero) == (record.params.total, record.params.nonzero), name
        if loaded.realization == "masked":
            weights = dict(loaded.model.named_parameters())
            assert loaded.masks and set(loaded.masks) <= set(weights), name
            assert all(not weights[n][~m].any() for n, m in loaded.masks.items()), name   # zeros where masked
    assert kinds == {"masked", "compacted"}


def test_a_compacted_model_is_smaller_and_rebuilds_without_the_method(results):
    out, records = results
    record = records["head-compacted"]
    model = load_artifact(record.run_id, out).model
    from sparsebench.models import create_model

    dense = create_model("vit_cifar_tiny", num_classes=10, img_size=16, in_chans=3)
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in dense.parameters())
    assert record.params.total < record.params.dense


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "export"])
def test_exports_match_pytorch(results, tmp_path, capsys, fmt):
    out, records = results
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="onnx export check needs onnxruntime (pip install '.[export]')")
    record = records["channel-compacted"]
    file = tmp_path / f"model.{fmt}"
    assert main(["export", record.run_id, "--dir", str(out), "--format", fmt, "--output", str(file)]) == 0
    assert "compacted model" in capsys.readouterr().out
    model = load_artifact(record.run_id, out).model
    x = torch.randn(8 if fmt == "export" else 5, 3, 16, 16)   # torch.export fixes the batch (8); others take any
    with torch.no_grad():
        want = model(x)
        if fmt == "torchscript":
            got = torch.jit.load(str(file))(x)
        elif fmt == "export":
            got = torch.export.load(str(file)).module()(x)
        else:
            import onnxruntime

            session = onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
            got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    assert torch.allclose(want, got, atol=1e-4, rtol=1e-4)


def test_masked_export_says_it_keeps_its_zeros(results, tmp_path, capsys):
    out, records = results
    record = records["unstructured-masked"]
    assert main(["export", record.run_id, "--dir", str(out), "--format", "torchscript",
                 "--output", str(tmp_path / "m.pt")]) == 0
    assert "exported with its zeros" in capsys.readouterr().out


def test_retime_cpu_adds_device_entries_and_touches_nothing_else(results, tmp_path, capsys):
    import shutil

    out, records = results
    copy = tmp_path / "copy"
    shutil.copytree(out / "records", copy / "records")
    shutil.copytree(out / "models", copy / "models")
    before = {r.run_id: r for r in RecordStore(copy).load_all()}
    assert main(["retime", str(copy), "--device", "cpu", "--batch-sizes", "1", "--quiet"]) == 0
    assert f"retimed {len(before)} runs on cpu" in capsys.readouterr().out
    for after in RecordStore(copy).load_all():
        old = before[after.run_id]
        assert dataclasses.replace(after, retimed=None).to_dict() == old.to_dict()
        (label, entry), = after.retimed.items()
        assert label == old.device                  # the run's own device: its entries sit beside the run's
        (run,) = entry["runs"]                     # one runtime (eager), one realization
        assert run["runtime"] == "eager"
        assert run["realization"]["realizable"] == old.realization.realizable
        assert run["realization"]["kind"] == old.realization.kind
        if old.realization.kind == "auto":     # chosen again on this device, at the retimed batch
            assert run["realization"]["calibration"]["batch"] == 1 and run["realization"]["layers"]
        if old.realization.realizable:
            assert run["measured_speedup"] > 0 and list(run["latency"]["settings"]["batch_sizes"]) == [1]
        else:
            assert run["measured_speedup"] is None and run["latency"] is None
        sources = {(e["source"], e["batch"]) for e in after.latency_entries() if e["status"] == "measured"}
        assert ("retime", 1) in sources or not old.realization.realizable
    from sparsebench.report.leaderboard import records_frame

    frame = records_frame(RecordStore(copy).load_all())
    assert len(frame) == len(before) and frame["device"].nunique() == 1     # one device: one row per run


def test_retime_under_runtimes_and_realizations_keys_every_entry_and_keeps_earlier_ones(results, tmp_path, capsys):
    """`--runtime` and `--realization` add one run per (runtime, realization); a runtime that cannot run
    a realization says so in one line; a later call under another runtime keeps the earlier runs; the
    leaderboard's speedup is the fastest measured entry, named."""
    import shutil

    from sparsebench.report.leaderboard import records_frame

    out, records = results
    copy = tmp_path / "copy"
    shutil.copytree(out / "records", copy / "records")
    shutil.copytree(out / "models", copy / "models")
    masked, compacted = records["unstructured-masked"], records["channel-compacted"]
    for run_id in set(r.run_id for r in RecordStore(copy).load_all()) - {masked.run_id, compacted.run_id}:
        (copy / "records" / f"{run_id}.json").unlink()           # two runs keep the test short
    assert main(["retime", str(copy), "--device", "cpu", "--batch-sizes", "1", "--runtime", "eager", "onnxruntime",
                 "--realization", "auto", "csr"]) == 0
    printed = capsys.readouterr().out
    assert "not supported by onnxruntime:" in printed and "(csr, eager)" in printed
    after = {r.run_id: r for r in RecordStore(copy).load_all()}
    entries = {(e["runtime"], e["realization"]): e for e in after[masked.run_id].latency_entries()
               if e["source"] == "retime"}
    assert set(entries) == {("eager", "auto"), ("onnxruntime", "auto"), ("eager", "csr"), ("onnxruntime", "csr")}
    assert entries["onnxruntime", "csr"]["status"].startswith("not supported by onnxruntime: ")
    assert entries["eager", "csr"]["status"] == "measured" and entries["eager", "csr"]["sparse_layers"] > 0
    compact = {(e["runtime"], e["realization"]): e for e in after[compacted.run_id].latency_entries()
               if e["source"] == "retime"}
    assert set(compact) == {("eager", "compacted"), ("onnxruntime", "compacted")}
    assert all(e["status"] == "measured" and e["measured_speedup"] > 0 for e in compact.values())
    # a later call under compile adds its runs and keeps the others
    assert main(["retime", str(copy), "--device", "cpu", "--batch-sizes", "1", "--runtime", "compile",
                 "--quiet"]) == 0
    again = {r.run_id: r for r in RecordStore(copy).load_all()}
    keys = {(e["runtime"], e["realization"]) for e in again[compacted.run_id].latency_entries()
            if e["source"] == "retime"}
    assert keys == {("eager", "compacted"), ("onnxruntime", "compacted"), ("compile", "compacted")}
    frame = records_frame(again.values()).set_index("run_id")
    best = again[masked.run_id].best_latency_entry()
    assert frame.loc[masked.run_id, "measured_speedup"] == best["measured_speedup"]
    assert frame.loc[masked.run_id, "realization"].endswith(", " + best["runtime"])


def test_retime_within_a_time_budget_times_in_shares_and_lists_the_runs_left(results, tmp_path, capsys):
    import shutil
    import time

    out, records = results
    copy = tmp_path / "copy"
    shutil.copytree(out / "records", copy / "records")
    shutil.copytree(out / "models", copy / "models")
    before = {r.run_id: r for r in RecordStore(copy).load_all()}
    start = time.perf_counter()
    assert main(["retime", str(copy), "--device", "cpu", "--max-seconds", "1.5", "--quiet"]) == 0
    assert time.perf_counter() - start < 8
    timings = [t for r in RecordStore(copy).load_all() for e in (r.retimed or {}).values() for run in e["runs"]
               for b, t in (run["latency"] or {}).items() if b != "settings"]
    assert timings and sum(t["seconds"] for t in timings) < 1.5 + 0.2 * len(timings)
    assert main(["retime", str(copy), "--device", "cpu", "--max-seconds", "1e-9"]) == 0
    assert f"{len(before)} runs not reached within --max-seconds 1e-09" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_retime_on_a_missing_gpu_is_one_line(results, capsys):
    out, _ = results
    mtimes = sorted(p.stat().st_mtime_ns for p in (out / "records").glob("*.json"))
    assert main(["retime", str(out), "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'cuda' is not available here" in err[0]
    assert sorted(p.stat().st_mtime_ns for p in (out / "records").glob("*.json")) == mtimes


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "does not match the record's SHA-256"),
    (lambda p: p.unlink(), "is missing"),
])
def test_a_corrupt_or_missing_model_is_one_line_naming_the_run(results, tmp_path, capsys, damage, message):
    import shutil

    out, records = results
    copy = tmp_path / "copy"
    shutil.copytree(out / "records", copy / "records")
    shutil.copytree(out / "models", copy / "models")
    bad = records["channel-compacted"]
    damage(copy / bad.artifact["path"])
    assert main(["load", bad.run_id, "--dir", str(copy)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and bad.run_id in err[0] and message in err[0]
    # retime reports it in one line and retimes the others; the damaged run's record is unchanged
    record_text = (copy / "records" / f"{bad.run_id}.json").read_text()
    assert main(["retime", str(copy), "--device", "cpu", "--batch-sizes", "1", "--quiet"]) == 1
    captured = capsys.readouterr()
    assert [line for line in captured.err.splitlines() if bad.run_id in line] == \
        [line for line in captured.err.splitlines() if line.startswith("sparsebench: error:")]
    assert f"retimed {len(records) - 1} runs" in captured.out
    assert (copy / "records" / f"{bad.run_id}.json").read_text() == record_text


def test_a_file_with_a_valid_hash_but_no_structure_is_refused(results, tmp_path):
    """An artifact the record trusts but that holds no module tree (e.g. written by other code)."""
    import hashlib
    import shutil

    from safetensors.torch import save

    out, records = results
    copy = tmp_path / "copy"
    shutil.copytree(out / "records", copy / "records")
    bad = records["unstructured-masked"]
    data = save({"param/x": torch.zeros(2)}, metadata={"format": "other"})
    (copy / "models").mkdir()
    (copy / bad.artifact["path"]).write_bytes(data)
    record_file = copy / "records" / f"{bad.run_id}.json"
    d = json.loads(record_file.read_text())
    d["artifact"]["sha256"] = hashlib.sha256(data).hexdigest()
    record_file.write_text(json.dumps(d))
    with pytest.raises(ArtifactError, match=f"run {bad.run_id}: .*lacks the module structure"):
        load_artifact(bad.run_id, copy)


def test_an_interrupted_save_leaves_no_record_and_no_file(results, tmp_path, monkeypatch):
    import sparsebench.runners.artifacts as artifacts

    out, _ = results
    spec = resolve(tiny_spec("magnitude-global", target="sparsity=0.5"))

    def fail(path, data):
        raise KeyboardInterrupt

    monkeypatch.setattr(artifacts, "atomic_write_bytes", fail)
    with pytest.raises(KeyboardInterrupt):
        execute(spec, RunOptions(out=tmp_path, cache_dir=out / "checkpoints", save_model=True))
    assert not RecordStore(tmp_path).exists(spec.run_id)
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").iterdir())


def test_no_save_models_saves_nothing(results, tmp_path, capsys):
    out, _ = results
    code = main(["run", "--method", "dense", "--model", "resnet20_tiny", "--dataset", "digits", "--img-size", "16",
                 "--recipe", "batch_size=64", "--recipe", "pretrain_epochs=1", "--no-latency", "--quiet",
                 "--out", str(tmp_path), "--no-save-models"])
    assert code == 0
    (record,) = RecordStore(tmp_path).load_all()
    assert record.artifact is None and not (tmp_path / "models").exists()

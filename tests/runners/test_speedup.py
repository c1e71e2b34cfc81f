import pytest

from sparsebench.runners.speedup import SpeedupConfig, speedup_rows


def test_speedup_rows_on_tiny_models():
    config = SpeedupConfig(models=("resnet20_tiny", "vit_cifar_tiny"), flops=(0.5,), img_size=16,
                           batch_sizes=(1, 4), threads=(1,), min_run_time=0.01, rounds=2)
    rows = speedup_rows(config)
    assert len(rows) == 4
    for row in rows:
        assert 0.49 <= row["achieved_flops_ratio"] <= 0.5
        assert row["max_abs_error"] < 1e-4
        assert row["theoretical_speedup"] == pytest.approx(1 / row["achieved_flops_ratio"])
        assert row["measured_speedup"] == pytest.approx(row["dense_ms"] / row["realized_ms"])


def test_bf16_rows_at_every_flops_target():
    """Timing in bf16 used to cast the dense model in place, so the second target's compaction
    check failed on its fp32 probe ("expected scalar type Float but found BFloat16")."""
    config = SpeedupConfig(models=("resnet20_tiny",), flops=(0.75, 0.5), img_size=16, batch_sizes=(1,),
                           threads=(1,), dtype="bfloat16", min_run_time=0.01, rounds=2)
    rows = speedup_rows(config)
    assert [r["target_flops"] for r in rows] == [0.75, 0.5]
    assert all(r["dtype"] == "bfloat16" and r["measured_speedup"] > 0 for r in rows)


def test_unstructured_rows_time_each_realization_against_dense():
    from sparsebench.runners.speedup import magnitude_masked
    from sparsebench.models import create_model

    config = SpeedupConfig(models=("vit_cifar_tiny",), flops=(), sparsities=(0.9,), img_size=16, batch_sizes=(1, 2),
                           threads=(1,), min_run_time=0.01, rounds=2, calibration_seconds=1.0)
    rows = speedup_rows(config)
    assert [(r["realization"], r["batch"]) for r in rows] == [("auto", 1), ("auto", 2), ("csr", 1), ("csr", 2)]
    for row in rows:
        assert row["status"] == "measured" and row["target_sparsity"] == 0.9 and "target_flops" not in row
        assert row["theoretical_speedup"] == pytest.approx(1 / row["achieved_flops_ratio"])
        assert row["theoretical_speedup"] > 1.5
        assert row["measured_speedup"] == pytest.approx(row["dense_ms"] / row["realized_ms"])
    assert all(r["sparse_layers"] > 0 for r in rows if r["realization"] == "csr")
    # the masks: input layer and classifier dense, the rest at the target, the dense model untouched
    dense = create_model("vit_cifar_tiny", img_size=16)
    for scope in ("layerwise", "global"):
        masked = magnitude_masked(dense, 0.9, scope)
        weights = [(n, p) for n, p in masked.named_parameters() if p.dim() > 1 and "pos_embed" not in n
                   and "cls_token" not in n]
        zeros = sum(int((p == 0).sum()) for _, p in weights[1:-1])
        assert zeros == pytest.approx(0.9 * sum(p.numel() for _, p in weights[1:-1]), rel=1e-3)
        assert bool((weights[0][1] != 0).all() and (weights[-1][1] != 0).all())
    assert all(bool((p != 0).all()) for n, p in dense.named_parameters() if p.dim() > 1 and "embed" not in n)


def test_speedup_command_tables_unstructured_targets_alone(tmp_path, capsys):
    from sparsebench.cli.main import main

    assert main(["speedup", "--models", "resnet20_tiny", "--img-size", "16", "--flops", "--sparsity", "0.9",
                 "--kernels", "csr", "--batch-sizes", "2", "--threads", "1", "--min-run-time", "0.01",
                 "--rounds", "2", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "magnitude-layerwise" in out and "| csr " in out and "target_flops" not in out
    assert "Magnitude masks (layerwise" in (tmp_path / "speedup.md").read_text()
    assert main(["speedup", "--models", "resnet20_tiny", "--flops"]) == 2
    assert "nothing to time" in capsys.readouterr().err


def test_speedup_command_times_each_runtime_and_says_which_cannot_run_a_realization(tmp_path, capsys):
    """--runtimes: a row per runtime; ONNX Runtime times the compacted model and refuses CSR layers in
    one line; the plot of measured against theoretical speedup is written beside the table."""
    from sparsebench.cli.main import main

    assert main(["speedup", "--models", "resnet20_tiny", "--img-size", "16", "--flops", "0.5", "--sparsity", "0.9",
                 "--kernels", "csr", "--batch-sizes", "2", "--threads", "1", "--min-run-time", "0.01",
                 "--rounds", "2", "--runtimes", "eager", "onnxruntime", "--quiet", "--out", str(tmp_path)]) == 0
    import pandas as pd

    table = pd.read_csv(tmp_path / "speedup.csv")
    rows = {(r.realization, r.runtime): r for r in table.itertuples()}
    assert set(rows) == {("compacted", "eager"), ("compacted", "onnxruntime"), ("csr", "eager"), ("csr", "onnxruntime")}
    assert rows["compacted", "onnxruntime"].status == "measured" and rows["compacted", "onnxruntime"].measured_speedup > 0
    assert rows["csr", "eager"].status == "measured"
    assert rows["csr", "onnxruntime"].status.startswith("not supported by onnxruntime: ")
    assert (tmp_path / "measured_vs_theoretical.png").stat().st_size > 10_000
    with pytest.raises(SystemExit) as refused:
        main(["speedup", "--models", "resnet20_tiny", "--runtimes", "tensorrt"])
    assert refused.value.code == 2 and "invalid choice: 'tensorrt'" in capsys.readouterr().err

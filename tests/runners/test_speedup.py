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

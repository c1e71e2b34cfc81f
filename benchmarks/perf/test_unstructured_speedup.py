"""Measured speedup of unstructured masks through the `auto` realizer (per layer the faster of dense
and CSR × dense, by a timed calibration), against dense, in one process:

    python -m pytest benchmarks/perf/test_unstructured_speedup.py -s            # full: DeiT-S and ResNet-50
    SPARSEBENCH_PERF_SHORT=1 python -m pytest benchmarks/perf/test_unstructured_speedup.py -s

Full mode: `deit_small` and `resnet50` at 224 px, per-layer magnitude masks at 50/80/90/95 %
(input layer and classifier dense, as the magnitude baselines prune), random weights (latency does
not depend on trained values), batch 1, 1 thread. The DeiT-S goals are asserted: ≥ 1.3× at 90 %,
≥ 2× at 95 %; ResNet-50's figures are printed (convolutions lowered to CSR products lose to dense
direct convolution on many layers, and auto keeps those dense). Short mode: the same at 64 px for
90 and 95 %, timing bounds reported only (conftest.py).
"""
from __future__ import annotations

import pytest

from sparsebench.runners.speedup import SpeedupConfig, unstructured_rows

from test_perf import SHORT, check_bound, finite

SPARSITIES = (0.9, 0.95) if SHORT else (0.5, 0.8, 0.9, 0.95)
GOALS = {0.9: 1.3, 0.95: 2.0}          # deit_small, batch 1, 1 thread


def _table(model: str) -> list:
    config = SpeedupConfig(models=(model,), flops=(), sparsities=SPARSITIES, kernels=("auto",),
                           img_size=64 if SHORT else 224, batch_sizes=(1,), threads=(1,),
                           min_run_time=0.05 if SHORT else 0.2, rounds=2 if SHORT else 6,
                           calibration_seconds=5.0 if SHORT else 60.0)
    rows = unstructured_rows(config)
    print(f"\n{model} @ {config.img_size} px, batch 1, 1 thread, magnitude-layerwise, auto:")
    for r in rows:
        assert r["status"] == "measured", r["status"]
        finite(r["dense_ms"], r["realized_ms"], r["measured_speedup"])
        print(f"  sparsity {r['target_sparsity']:.2f}: {r['sparse_layers']}/{r['layers']} layers on CSR, "
              f"calibration {r['calibration_s']:.1f} s, dense {r['dense_ms']:.1f} ms, auto {r['realized_ms']:.1f} ms, "
              f"measured {r['measured_speedup']:.2f}× [{r['speedup_ci95_low']:.2f}–{r['speedup_ci95_high']:.2f}] "
              f"(theoretical {r['theoretical_speedup']:.2f}×)")
    return rows


def test_deit_small_auto_speedup_meets_its_goals():
    for r in _table("deit_small"):
        goal = GOALS.get(r["target_sparsity"])
        if goal is not None:
            check_bound(r["measured_speedup"] >= goal, f"deit_small at sparsity {r['target_sparsity']}: "
                        f"auto {r['measured_speedup']:.2f}× over dense, goal ≥ {goal}×")


@pytest.mark.parametrize("model", ["resnet50"])
def test_cnn_auto_speedup_is_never_far_below_dense(model):
    """auto keeps a layer dense unless CSR won its calibration, so the model is not much slower than
    dense (layer timings in isolation miss some cache effects: 0.9× is the bound)."""
    for r in _table(model):
        check_bound(r["measured_speedup"] >= 0.9, f"{model} at sparsity {r['target_sparsity']}: "
                    f"auto {r['measured_speedup']:.2f}× over dense")

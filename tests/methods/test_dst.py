import pytest

from sparsebench.methods import create_method
from sparsebench.methods.dst import cubic_sparsity

from conftest import make_context


def test_cubic_schedule_endpoints_and_shape():
    assert cubic_sparsity(0, 0.0, 0.9, 10, 100) == 0.0
    assert cubic_sparsity(110, 0.0, 0.9, 10, 100) == pytest.approx(0.9)
    assert cubic_sparsity(500, 0.0, 0.9, 10, 100) == pytest.approx(0.9)
    # halfway the cubic is at 1 - 1/8 of the way
    assert cubic_sparsity(60, 0.0, 0.8, 10, 100) == pytest.approx(0.8 * (1 - 0.5 ** 3))


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gmp_follows_the_schedule_and_ends_at_target(scope):
    method = create_method("gmp", scope=scope)
    ctx = make_context("resnet20_tiny", "sparsity=0.9", method, budget=40)
    outcome = method.run(ctx)
    history = outcome.notes["prune_history"]
    assert len(history) >= 10
    achieved = [h["sparsity"] for h in history]
    assert achieved == sorted(achieved)                               # never decreases
    for h in history:
        n = sum(m.numel() for m in outcome.masks.masks.values())
        assert abs(h["sparsity"] - h["target"]) <= len(outcome.masks.masks) / n + 1e-9
    assert outcome.masks.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert ctx.budget.used == 40


def test_gmp_is_deterministic():
    def masks():
        method = create_method("gmp")
        ctx = make_context("resnet20_tiny", "sparsity=0.8", method, budget=12)
        return method.run(ctx).masks.masks

    a, b = masks(), masks()
    assert all((a[n] == b[n]).all() for n in a)

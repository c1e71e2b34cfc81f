"""A run killed in the dense pretrain, the method and the fine-tune ends as an uninterrupted run does."""
import pytest
import torch

from sparsebench.methods import METHODS, register_method
from sparsebench.methods.dst import GMP
from sparsebench.runners.pipeline import RunOptions, execute
from sparsebench.specs import MeasureSpec

from conftest import Killed, kill_after, tiny_spec

KEPT = []


def keeping(name, base):
    """Register `base` under `name`, keeping each outcome (final model and masks) in KEPT for the test."""

    @register_method(name)
    class Kept(base):
        def run(self, ctx):
            outcome = super().run(ctx)
            KEPT.append(outcome)
            return outcome

    try:
        yield
    finally:
        METHODS._entries.pop(name)
        KEPT.clear()


@pytest.fixture
def kept_gmp():
    yield from keeping("test-kept-gmp", GMP)


RESULT_KEYS = ("test_top1", "val_top1", "achieved_sparsity", "achieved_flops_ratio", "dense_test_top1",
               "dense_val_top1", "selection", "notes", "macs", "params")


def test_killed_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, kept_gmp):
    spec = tiny_spec("test-kept-gmp", target="sparsity=0.6", measure=MeasureSpec(latency=False, threads=1))
    reference = execute(spec, RunOptions(out=tmp_path / "ref", checkpoint_every=4))
    final = KEPT[-1]
    cost = reference.cost
    dense, method, finetune = cost.dense_pretrain_steps, cost.method_steps, cost.finetune_steps
    assert min(dense, method, finetune) > 10

    options = RunOptions(out=tmp_path / "run", checkpoint_every=4)
    run = tmp_path / "run"
    kills = [10,                               # in the dense pretrain (saved at step 8)
             (dense - 8) + 10,                 # in the method's fit (saved at 8)
             (method - 8) + 6]                 # in the fine-tune (saved at 4); the method fit is complete
    for n in kills:
        restore = kill_after(monkeypatch, n)
        with pytest.raises(Killed):
            execute(spec, options)
        restore()
        assert any(run.rglob("fit-0.pt"))
    resumed = execute(spec, options)

    for key in RESULT_KEYS:
        assert getattr(resumed, key) == getattr(reference, key), key
    for key in ("method_steps", "finetune_steps", "dense_pretrain_steps", "train_macs"):
        assert getattr(resumed.cost, key) == getattr(cost, key), key
    assert resumed.cost.resumed_fits == 2            # the method's fit (complete) and the fine-tune
    model = KEPT[-1]
    for k, v in final.model.state_dict().items():
        assert torch.equal(v, model.model.state_dict()[k]), k
    for k, m in final.masks.masks.items():
        assert torch.equal(m, model.masks.masks[k]), k
    left = [p.relative_to(run).parts[0] + "/" + p.name for p in run.rglob("*.pt")]
    assert len(left) == 1 and left[0].startswith("checkpoints/dense-")   # a finished run keeps only the dense checkpoint


def test_record_states_training_macs(tmp_path, kept_gmp):
    spec = tiny_spec("test-kept-gmp", target="sparsity=0.6", measure=MeasureSpec(latency=False, threads=1))
    record = execute(spec, RunOptions(out=tmp_path, resume=False))
    macs = record.cost.train_macs
    per_image = record.macs.dense
    dense = macs["dense_pretrain"]
    assert dense["forward"] == record.cost.dense_pretrain_steps * spec.recipe.batch_size * per_image
    assert dense["backward"] == 2 * dense["forward"]
    # GMP starts dense and prunes on the way: cheaper than dense training of the same steps
    assert 0 < macs["method"]["forward"] < record.cost.method_steps * spec.recipe.batch_size * per_image
    # the fine-tune trains at the final sparsity
    assert macs["finetune"]["forward"] == pytest.approx(
        record.cost.finetune_steps * spec.recipe.batch_size * record.macs.effective, rel=1e-4)
    assert "backward = 2 x forward" in macs["convention"]
    assert not (tmp_path / "partial").exists()


@pytest.fixture
def kept_rigl():
    from sparsebench.methods.dst import RigL

    yield from keeping("test-kept-rigl", RigL)


@pytest.mark.parametrize("method, model, target, args", [
    ("test-kept-rigl", "resnet20_tiny", "sparsity=0.8", {"delta_t": 3}),
    ("svite", "vit_cifar_tiny", "sparsity=0.7", {"update_every": 3}),
    ("s2vite", "vit_cifar_tiny", "flops=0.6", {"grow": "random", "alpha": 0.9, "update_every": 3}),
    ("s2vite", "vit_cifar_tiny", "flops=0.6", {"grow": "revival", "update_every": 3}),   # shadow weights
    ("gap-cyclic", "resnet20_tiny", "sparsity=0.8", {}),          # killed in its second phase
])
def test_a_run_killed_between_topology_updates_resumes_to_the_same_topology(tmp_path, monkeypatch, kept_rigl,
                                                                            method, model, target, args):
    """The kill falls after the method's checkpoint at step 4 and before step 8: the updates at
    steps 6 (and 3 for S²ViTE) must replay from the hook's saved generator, history and masks;
    GaP's finished phase replays from its fit's final checkpoint."""
    spec = tiny_spec(method, model=model, target=target, method_args=tuple(sorted(args.items())),
                     measure=MeasureSpec(latency=False, threads=1))
    reference = execute(spec, RunOptions(out=tmp_path / "ref", checkpoint_every=4))
    reference_masks = KEPT[-1].masks.masks if KEPT else None
    options = RunOptions(out=tmp_path / "run", checkpoint_every=4)
    restore = kill_after(monkeypatch, reference.cost.dense_pretrain_steps + 7)   # the method's 7th step
    with pytest.raises(Killed):
        execute(spec, options)
    restore()
    resumed = execute(spec, options)
    assert resumed.cost.resumed_fits >= 1
    mech, ref = resumed.mechanism, reference.mechanism
    assert mech.metrics == ref.metrics and mech.acted
    assert mech.metrics.get("updates", mech.metrics.get("prune_backs")) >= 2
    assert resumed.curves["method"]["events"] == reference.curves["method"]["events"]
    assert resumed.structure == reference.structure and resumed.test_top1 == reference.test_top1
    if reference_masks is not None:
        assert all(torch.equal(KEPT[-1].masks.masks[n], m) for n, m in reference_masks.items())

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


# --- RigL / SET ---------------------------------------------------------------------------------
import copy
import math

import torch
from torch import nn

from sparsebench.specs import Recipe
from sparsebench.training.trainer import HookOrder, Trainer
from sparsebench.training.masks import (
    DynamicSparsity, MaskSet, cosine_drop_fraction, drop_and_grow, initial_masks, prunable_weights, prune_and_grow,
)


def test_cosine_drop_fraction_starts_at_alpha_and_stops_at_t_end():
    assert cosine_drop_fraction(0, 0.3, 100) == pytest.approx(0.3)
    assert cosine_drop_fraction(50, 0.3, 100) == pytest.approx(0.15)
    assert cosine_drop_fraction(100, 0.3, 100) == 0.0
    assert cosine_drop_fraction(150, 0.3, 100) == 0.0
    values = [cosine_drop_fraction(t, 0.3, 100) for t in range(0, 100, 10)]
    assert values == sorted(values, reverse=True)


def test_drop_and_grow_on_hand_built_tensors():
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0], dtype=torch.bool)
    weight = torch.tensor([0.5, -0.1, 0.9, 0.05, -0.7, 0, 0, 0, 0, 0])
    grads = torch.tensor([0.01, 0.02, 9.0, 0.0, 9.0, 0.2, 3.0, -0.1, 2.0, 0.4]).abs()
    new = drop_and_grow(mask, weight, grads, 2)
    assert int(new.sum()) == int(mask.sum())
    dropped = (mask & ~new).nonzero().flatten().tolist()
    grown = (new & ~mask).nonzero().flatten().tolist()
    assert dropped == [1, 3]            # the two smallest |w| among active
    assert grown == [6, 8]              # the two largest |g| among inactive (large |g| of kept entries ignored)


def test_a_dropped_weight_with_a_large_gradient_is_regrown_as_in_official_rigl():
    mask = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    new = drop_and_grow(mask, torch.tensor([0.1, 1.0, 0, 0]), torch.tensor([5.0, 0.0, 1.0, 0.5]), 1)
    assert new.tolist() == mask.tolist()


def test_drop_and_grow_counts_are_exact_under_ties():
    mask = torch.zeros(100, dtype=torch.bool)
    mask[:40] = True
    weight = torch.where(mask, 1.0, 0.0)          # every active |w| tied
    grads = (~mask).float()                       # every inactive |g| tied
    new = drop_and_grow(mask, weight, grads, 13, torch.Generator().manual_seed(0))
    assert int(new.sum()) == 40 and int((mask & ~new).sum()) == 13 and int((new & ~mask).sum()) == 13


@pytest.mark.parametrize("grow", ["gradient", "random"])
def test_topology_update_keeps_nnz_zeroes_grown_state_and_stops_at_t_end(grow):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    params = prunable_weights(model)
    g = torch.Generator().manual_seed(0)
    masks = MaskSet(model, initial_masks(params, 0.7, "erk", "random", g))
    topology = DynamicSparsity(masks, delta_t=3, t_end=20, alpha=0.3, grow=grow, generator=g)
    assert topology.order == HookOrder.READS_DENSE_GRADIENTS < masks.order
    x, y = torch.randn(64, 8), torch.randint(0, 2, (64,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = Trainer(model, loader, Recipe(weight_decay=0.1), torch.device("cpu"), 2, 0.5, hooks=[masks, topology])
    trainer.restart_schedule(30)
    nnz = masks.nnz()
    for _ in range(30):
        before = {n: m.clone() for n, m in masks.masks.items()}
        trainer.train_step()
        assert masks.nnz() == nnz
        if not topology.is_update_step(trainer.step):
            assert all(torch.equal(before[n], masks.masks[n]) for n in before)
        for n, p in masks.params.items():
            grown = masks.masks[n] & ~before[n]
            assert torch.all(p[grown] == 0)
            assert torch.all(trainer.optimizer.state[p]["momentum_buffer"][grown] == 0)
            assert torch.all(p[~masks.masks[n]] == 0)
    assert [h["step"] for h in topology.history] == [3, 6, 9, 12, 15, 18]     # none at or after T_end = 20


def test_rigl_reads_the_dense_gradient_before_masking():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
    params = prunable_weights(model)
    masks = MaskSet(model, initial_masks(params, 0.8, "uniform", "random", torch.Generator().manual_seed(0)))
    topology = DynamicSparsity(masks, delta_t=1, t_end=10, grow="gradient")
    seen = {}
    topology_update = topology.update

    def spy(step, optimizer=None, gradients=None):
        seen.update({n: g.clone() for n, g in topology._gradients.items()})
        return topology_update(step, optimizer, gradients)

    topology.update = spy
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = Trainer(model, loader, Recipe(), torch.device("cpu"), 2, 0.1, hooks=[masks, topology])
    before = {n: m.clone() for n, m in masks.masks.items()}
    trainer.restart_schedule(1)
    trainer.train_step()
    for n in seen:
        assert (seen[n][~before[n]] != 0).any()           # the gradient at masked entries was visible


def _run(name, budget=30, seed=0, **args):
    method = create_method(name, **args)
    ctx = make_context("resnet20_tiny", "sparsity=0.9", method, seed=seed, budget=budget)
    return method.run(ctx), ctx


@pytest.mark.parametrize("name", ["rigl", "set"])
def test_rigl_and_set_keep_erk_density_and_respect_the_budget(name):
    outcome, ctx = _run(name)
    assert ctx.budget.used == 30
    assert outcome.masks.sparsity() == pytest.approx(0.9, abs=1e-3)
    assert outcome.notes["skip_first"] is True and outcome.notes["distribution"] == "erk"   # one prunable set for all
    assert "conv1.weight" not in outcome.prunable and ctx.card.classifier + ".weight" not in outcome.prunable
    assert outcome.notes["updates"] and all(u["step"] < outcome.notes["schedule"]["t_end"]
                                            for u in outcome.notes["updates"])


@pytest.mark.parametrize("name", ["rigl", "set"])
def test_rigl_and_set_are_deterministic(name):
    (a, _), (b, _) = _run(name, budget=12), _run(name, budget=12)
    assert all(torch.equal(a.masks.masks[n], b.masks.masks[n]) for n in a.masks.masks)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_set_original_uses_a_constant_fraction_at_epoch_ends():
    outcome, ctx = _run("set", budget=40, set_original=True)
    steps = [u["step"] for u in outcome.notes["updates"]]
    epoch = len(ctx.train_loader)
    assert steps == list(range(epoch, 40, epoch))
    assert all(u["drop_fraction"] == 0.3 for u in outcome.notes["updates"])


def test_bad_rigl_config_is_a_one_line_spec_error():
    from sparsebench.errors import SpecError

    with pytest.raises(SpecError, match="alpha"):
        create_method("rigl", alpha=1.5)


@pytest.mark.parametrize("name", ["rigl", "set"])
def test_rigl_and_set_run_end_to_end_through_the_pipeline(tmp_path, name):
    from sparsebench.runners.pipeline import RunOptions, execute
    from conftest import tiny_spec

    record = execute(tiny_spec(name, target="sparsity=0.9"), RunOptions(out=tmp_path))
    assert record.achieved_sparsity == pytest.approx(0.9, abs=1e-3)
    assert record.cost.method_steps <= record.cost.method_budget_steps
    assert record.notes["updates"]


# --- mechanism telemetry and the null control ------------------------------------------------------
@pytest.mark.parametrize("name", ["rigl", "set"])
def test_topology_updates_are_measured_and_the_null_control_never_changes_its_masks(name):
    outcome, ctx = _run(name, budget=30)
    control, control_ctx = _run(name, budget=30, topology_updates=False)
    m, c = outcome.mechanism, control.mechanism
    assert m.acted and not m.control and c.control and not c.acted
    events = ctx.curve.events_of("topology")
    assert len(events) == m.metrics["updates"] == len(outcome.notes["updates"]) >= 1
    assert [e["swapped"] for e in events] == m.metrics["swapped"]
    assert [e["regrown_new"] for e in events] == m.metrics["regrown_new"]
    assert 0 < m.metrics["regrown_new_total"] <= m.metrics["swapped_total"]
    # the same initial masks: the method's moved by exactly `mask_changed`, the control's never changed
    assert control.masks.version == 0 and not control_ctx.curve.events_of("topology")
    assert c.metrics["updates"] == 0 and c.metrics["mask_changed"] == 0.0
    active = sum(int(mask.sum()) for mask in outcome.masks.masks.values())
    moved = sum(int((outcome.masks.masks[n] & ~control.masks.masks[n]).sum()) for n in outcome.masks.masks)
    assert moved / active == pytest.approx(m.metrics["mask_changed"], abs=1e-4) and moved > 0
    assert control_ctx.budget.used == ctx.budget.used == 30
    assert outcome.masks.nnz() == control.masks.nnz()                 # same distribution


def test_dynamic_sparsity_resumes_its_generator_history_and_initial_masks():
    def build():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))
        g = torch.Generator().manual_seed(0)
        masks = MaskSet(model, initial_masks(prunable_weights(model), 0.7, "erk", "random", g))
        return model, masks, DynamicSparsity(masks, delta_t=1, t_end=10, grow="random", generator=g)

    model, masks, hook = build()
    hook.update(1)
    saved, saved_masks, weights = hook.state_dict(), masks.state_dict(), copy.deepcopy(model.state_dict())
    hook.update(2)
    expected = {n: m.clone() for n, m in masks.masks.items()}
    model2, masks2, hook2 = build()
    model2.load_state_dict(weights)
    masks2.load_state_dict(saved_masks)
    hook2.load_state_dict(saved)
    hook2.update(2)
    assert all(torch.equal(masks2.masks[n], expected[n]) for n in expected)
    assert hook2.telemetry() == hook.telemetry()


# --- the update schedule and extended training -------------------------------------------------------
def test_rigl_interval_comes_from_the_budget_with_the_shared_minimums():
    from sparsebench.training.masks import MIN_UPDATE_INTERVAL, MIN_UPDATES

    method = create_method("rigl")
    delta, t_end = method.schedule(285, 19)                # the CNN evidence budget
    assert (delta, t_end) == (MIN_UPDATE_INTERVAL, 213) and len(range(delta, t_end, delta)) >= MIN_UPDATES
    delta, t_end = method.schedule(570, 19)                # the ViT evidence budget: ≥ 20 updates
    assert delta == 21 and len(range(delta, t_end, delta)) >= MIN_UPDATES
    assert method.schedule(200_000, 390)[0] == 100         # a long run keeps RigL's official ΔT
    assert method.schedule(60, 19)[0] == MIN_UPDATE_INTERVAL   # a short one: fewer updates, never < 10 steps apart
    assert create_method("rigl", delta_t=3).schedule(285, 19)[0] == 3
    # extended training keeps the 1× interval, as RigL's multiplier does: 2× makes twice the updates
    delta2, t_end2 = create_method("rigl", budget_multiplier=2.0).schedule(570, 19)
    assert (delta2, t_end2) == (10, 427) and len(range(delta2, t_end2, delta2)) == 42


def test_budget_multiplier_trains_that_multiple_of_the_protocol_budget(tmp_path):
    from sparsebench.runners.pipeline import RunOptions, execute
    from sparsebench.specs import MeasureSpec
    from conftest import tiny_spec

    measure = MeasureSpec(latency=False, threads=1)
    one = execute(tiny_spec("rigl", target="sparsity=0.9", measure=measure), RunOptions(out=tmp_path))
    two = execute(tiny_spec("rigl", target="sparsity=0.9", method_args=(("budget_multiplier", 2.0),),
                            measure=measure), RunOptions(out=tmp_path))
    assert two.cost.method_budget_steps == 2 * one.cost.method_budget_steps
    assert two.cost.method_steps == 2 * one.cost.method_steps
    spent = [r.cost.train_macs["method"] for r in (one, two)]
    assert spent[1]["forward"] == pytest.approx(2 * spent[0]["forward"], rel=0.02)
    with pytest.raises(Exception, match="budget_multiplier"):
        create_method("rigl", budget_multiplier=0)
    with pytest.raises(Exception, match="needs scope='layer'"):
        create_method("gmp", scope="global", distribution="erk")


def test_a_delta_t_past_t_end_is_one_update_said_and_recorded(caplog):
    import logging

    method = create_method("rigl", delta_t=5000)
    ctx = make_context("resnet20_tiny", "sparsity=0.5", method, budget=20)
    with caplog.at_level(logging.WARNING, logger="sparsebench"):
        method.run(ctx)
    said = "delta_t 5000 >= 15, the update schedule's T_end (end_fraction 0.75 of 20 steps): one update, at step 14"
    assert ctx.adjustments == [{"setting": "delta_t", "given": 5000, "used": 14, "why": said}]
    assert [r.getMessage() for r in caplog.records] == [f"sparsebench: warning: {said}"]
    assert create_method("rigl", delta_t=14).schedule(20, 1)[0] == 14     # one that fits is used as given


# --- the layer set: the benchmark's by default, RigL's scripts' as `layers=official` ----------------
@pytest.mark.parametrize("name", ["rigl", "set", "gmp", "magnitude-global", "magnitude-layerwise", "random"])
def test_official_layer_set_is_rigls_first_layer_dense_classifier_pruned(name):
    method = create_method(name, layers="official")
    assert (method.config.skip_first, method.config.skip_last) == (True, False)
    ctx = make_context("vit_cifar_tiny", "sparsity=0.9", method, budget=4)
    outcome = method.run(ctx)
    first, classifier = ctx.card.edge_layers
    assert f"{classifier}.weight" in outcome.prunable and f"{first}.weight" not in outcome.prunable
    assert outcome.notes["layers"] == {"preset": "official", "skip_first": True, "skip_last": False}
    assert outcome.masks.layer_sparsity()[f"{classifier}.weight"] > 0.1          # pruned, not dense


@pytest.mark.parametrize("name", ["rigl", "gmp", "magnitude-global"])
def test_default_layer_set_keeps_input_layer_and_classifier_dense_and_says_so(name):
    method = create_method(name)
    outcome = method.run(make_context("resnet20_tiny", "sparsity=0.9", method, budget=4))
    assert outcome.notes["layers"] == {"preset": "benchmark", "skip_first": True, "skip_last": True}


def test_official_layer_set_refuses_a_contradicting_skip():
    from sparsebench.errors import SpecError

    with pytest.raises(SpecError, match="layers='official' is RigL's set"):
        create_method("rigl", layers="official", skip_last=True)
    with pytest.raises(SpecError, match="skip_first"):
        create_method("magnitude-global", layers="official", skip_first=False)
    with pytest.raises(SpecError, match="allowed: benchmark, official"):
        create_method("gmp", layers="all")


def test_layer_set_preset_is_in_the_spec_only_when_set():
    """Runs recorded before the preset existed keep their hashes: at its default it is left out."""
    from sparsebench.methods import config_dict
    from sparsebench.methods.base import method_label

    assert "layers" not in config_dict(create_method("rigl").config)
    official = config_dict(create_method("rigl", layers="official").config)
    assert official["layers"] == "official" and official["skip_last"] is False
    assert method_label("rigl", official) == "rigl[layers=official,skip_first=True,skip_last=False]"


def test_official_layer_set_reaches_the_record(tmp_path):
    from sparsebench.runners.pipeline import RunOptions, execute
    from conftest import tiny_spec

    spec = tiny_spec("rigl", target="sparsity=0.9", method_args=(("layers", "official"),))
    record = execute(spec, RunOptions(out=tmp_path))
    assert record.prunable.policy == "input layer dense" and record.prunable.dense_layers == ["conv1"]
    assert record.notes["layers"] == {"preset": "official", "skip_first": True, "skip_last": False}
    assert record.spec["method_args"]["layers"] == "official"
    assert record.achieved_sparsity == pytest.approx(0.9, abs=1e-3)

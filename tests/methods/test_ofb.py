"""OFB: the bi-mask, the FLOPs model, elimination, gradients, exact export, budget,
determinism, ablations and the real pipeline."""
import math

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from sparsebench.errors import SpecError
from sparsebench.measure.flops import count_macs
from sparsebench.methods import create_method
from sparsebench.methods.ofb import (
    BiMaskSearch, OFB, PMIM, SearchGroup, attention_cells, check_export, embed_cells, mlp_cells, ofb_macs,
    one_hot_loss,
)
from sparsebench.models import create_model
from sparsebench.training.vit_slim import vit_macs
from sparsebench.training.vit_widths import ViTWidthMasks

from conftest import make_context, set_fused_attention, tiny_spec


def test_search_space_matches_the_official_grids():
    cells = attention_cells(6, 64)                        # DeiT-S: 3 × 7
    assert len(cells) == 21 and {n for n, _ in cells} == {2, 4, 6} and {r for _, r in cells} == set(range(16, 65, 8))
    assert {n for n, _ in attention_cells(3, 64)} == {2, 3}
    assert {n for n, _ in attention_cells(3, 64, full_head_candidate=False)} == {2}
    assert [w for w, _ in mlp_cells(1536)] == list(range(384, 1537, 192))
    assert len(embed_cells(384)) == 17 and embed_cells(384)[0] == (192, 1)
    assert all(r == 64 for _, r in attention_cells(6, 64, "heads_only"))
    assert all(n == 6 for n, _ in attention_cells(6, 64, "dims_only"))


def _group(kind="attn", shape=(4, 16), seed=0):
    cells = attention_cells(*shape) if kind == "attn" else mlp_cells(shape[0])
    return SearchGroup(kind, 0, shape, cells, torch.Generator().manual_seed(seed), "cpu")


def test_bi_mask_is_lambda_sigma_plus_v_at_rank():
    g = _group()
    with torch.no_grad():
        g.alpha.copy_(torch.randn(g.alpha.shape, generator=torch.Generator().manual_seed(1)))
    lam = 0.37
    m = g.mask(lam)
    V = g.expected_keep()
    # V is non-increasing over rank, in both directions
    assert (V[1:] <= V[:-1] + 1e-7).all() and (V[:, 1:] <= V[:, :-1] + 1e-7).all()
    # reference ranks: heads by Σ σ(S), channels within a head by S
    soft = torch.sigmoid(g.S.detach())
    head_order = torch.argsort(soft.sum(1), descending=True)
    expected = torch.empty_like(m)
    for rh, h in enumerate(head_order.tolist()):
        for rc, c in enumerate(torch.argsort(g.S.detach()[h], descending=True).tolist()):
            expected[h, c] = lam * soft[h, c] + (1 - lam) * V[rh, rc]
    torch.testing.assert_close(m.detach(), expected, atol=1e-6, rtol=0)
    # expected width Σ V equals Σ_k p_k n_k r_k
    assert float(g.expected_width().detach()) == pytest.approx(float(V.detach().sum()), rel=1e-5)


def test_one_hot_loss_is_infinite_at_uniform_and_falls_toward_one_hot():
    K = 7
    uniform = torch.full((K,), 1 / K)
    peaked = torch.softmax(torch.tensor([4.0, 0, 0, 0, 0, 0, 0]), 0)
    assert one_hot_loss(uniform, torch.tensor(0.0), 0.0) > one_hot_loss(peaked, torch.tensor(0.0), 0.0) + 10
    assert float(one_hot_loss(peaked, torch.tensor(10.0), 1e-4, entropy=False, var=False)) == pytest.approx(1e-3)


@pytest.mark.parametrize("name,dim,depth,heads,gmacs", [("deit_tiny", 192, 12, 3, 1.26),
                                                       ("deit_small", 384, 12, 6, 4.60),
                                                       ("deit_base", 768, 12, 12, 17.53)])
def test_analytic_flops_model_reproduces_official_dense_counts(name, dim, depth, heads, gmacs):
    with torch.device("meta"):
        model = VisionTransformer(img_size=224, patch_size=16, embed_dim=dim, depth=depth, num_heads=heads)
    hidden = 4 * dim
    dense = ofb_macs(model, 196, dim, [dim] * depth, [hidden] * depth, [heads] * depth)
    assert dense / 1e9 == pytest.approx(gmacs, abs=0.01)
    # the harness convention (cls token, no LayerNorm / element-wise) within 1 %
    assert dense == pytest.approx(vit_macs(model, input_size=(3, 224, 224)), rel=0.01)


def test_analytic_flops_model_tracks_the_counter_at_tiny_scale():
    model = create_model("vit_cifar_tiny", num_classes=10, img_size=32)
    dense = ofb_macs(model, 64, 64, [64] * 4, [256] * 4, [4] * 4)
    assert dense == pytest.approx(count_macs(model, (3, 32, 32)).macs, rel=0.03)


@pytest.fixture(scope="module")
def short_run():
    method = create_method("ofb")
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=12)
    return method.run(ctx), ctx


def test_elimination_is_monotone_and_final_groups_have_one_cell(short_run):
    outcome, _ = short_run
    groups = outcome.notes["groups"]
    assert all(g["choice"][0] is not None for g in groups)
    active = {}
    for event in outcome.notes["events"]:
        assert event["active"] <= active.get(event["group"], math.inf)
        active[event["group"]] = event["active"]
        if event["event"] == "final":
            assert event["active"] == 1
    assert outcome.notes["forced_groups"] == len(outcome.notes["forced"])
    assert (outcome.notes["forced_note"] is None) == (outcome.notes["forced_groups"] == 0)


def test_elimination_shrinks_alive_sets_nested():
    g = _group()
    alive = [g.alive.clone()]
    probs = torch.linspace(3, -3, len(g.cells))
    with torch.no_grad():
        g.alpha.copy_(probs)
    steps = 0
    while not g.final and steps < 50:
        g.eliminate(0.2, steps)
        with torch.no_grad():
            g.alpha[g.active] -= 0.3 * torch.arange(int(g.active.sum())).float()
        alive.append(g.alive.clone())
        steps += 1
    assert g.final and int(g.active.sum()) == 1
    assert all(bool((b <= a).all()) for a, b in zip(alive, alive[1:]))        # only ever shrinks
    n, r = (int(v) for v in g.cells[g.active][0])
    assert int(g.alive.any(1).sum()) == n and set(g.alive.sum(1)[g.alive.any(1)].tolist()) == {r}


def test_export_is_a_smaller_timm_vit_equal_to_the_masked_model(short_run):
    outcome, ctx = short_run
    assert isinstance(outcome.model, VisionTransformer) and outcome.realization == "compacted"
    assert outcome.notes["export_max_abs_error"] < 1e-5
    assert count_macs(outcome.model, ctx.input_size).macs < ctx.dense_macs


def _searched_model(embed_width, seed=0):
    """A model with open groups forced to random cells (embedding pruned to `embed_width`)."""
    method = create_method("ofb")
    torch.manual_seed(seed)
    model = create_model("vit_cifar_tiny", num_classes=10, img_size=16).eval()
    masks = ViTWidthMasks(model)
    groups = method.build_groups(model, "cpu", torch.Generator().manual_seed(seed))
    search = BiMaskSearch(model, masks, groups, method.config, 10, 0.0, (3, 16, 16))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for grp in groups:
            grp.S.copy_(torch.randn(grp.S.shape, generator=g))
            if grp.kind == "embed":
                grp.alpha.copy_((grp.cells[:, 0] == embed_width).float() * 10)
            else:
                grp.alpha.copy_(torch.randn(grp.alpha.shape, generator=g) * 3)
    for grp in groups:
        grp.finalize(0, forced=True)          # each group's argmax cell
    return model, masks, search


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("embed_width", [64, 40])
def test_export_equivalence_with_pruned_embedding(embed_width, fused):
    model, masks, search = _searched_model(embed_width)
    set_fused_attention(model, fused)
    lam = 0.3
    slim, structure, _ = OFB.export(model, search, lam)
    search.set_masks(lam)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    error = check_export(model, slim, x, tolerance=1e-5)
    masks.remove()
    assert error < 1e-5
    assert slim.embed_dim == embed_width
    assert (structure.embed is None) == (embed_width == 64) or len(structure.embed) == 64
    with torch.no_grad():
        assert (model(x) - slim(x)).abs().max() > 1e-3         # the export is not the dense model


def test_gradients_reach_scores_logits_decoder_and_mask_token():
    method = create_method("ofb")
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=5)
    torch.manual_seed(0)
    model = ctx.model
    masks = ViTWidthMasks(model)
    groups = method.build_groups(model, "cpu", torch.Generator().manual_seed(0))
    search = BiMaskSearch(model, masks, groups, method.config, 2, 0.0, ctx.input_size)
    search.target_macs = 0.5 * search.dense_macs
    groups[0].finalize(0)                                   # one final group: its α must get nothing
    pmim = PMIM(model, masks, method.config, 2, 16, torch.Generator().manual_seed(0))
    trainer = ctx.make_trainer(hooks=[search, pmim], param_groups=[
        {"params": [g.S for g in groups] + [pmim.mask_token], "weight_decay": 0.0},
        {"params": [g.alpha for g in groups if g.alpha.requires_grad]},
        {"params": list(pmim.decoder.parameters())}])
    trainer.restart_schedule(5)
    x, y = trainer.next_batch()
    x, y = search.before_forward(trainer, x, y) or (x, y)
    pmim.before_forward(trainer, x, y)
    model.train()
    out = model(x)
    loss = pmim.compute_loss(trainer, x, out, y, torch.nn.functional.cross_entropy(out, y))
    loss = loss + search.extra_loss(trainer, x, out, y)
    loss.backward()
    assert all(g.S.grad is not None and g.S.grad.abs().sum() > 0 for g in groups)
    assert groups[0].alpha.grad is None
    assert all(g.alpha.grad is not None and g.alpha.grad.abs().sum() > 0 for g in groups[1:])
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pmim.decoder.parameters())
    assert pmim.mask_token.grad is not None and pmim.mask_token.grad.abs().sum() > 0
    masks.remove()


def test_search_meets_the_flops_target_within_three_percent():
    method = create_method("ofb")
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=90)
    outcome = method.run(ctx)
    achieved = count_macs(outcome.model, ctx.input_size).macs / ctx.dense_macs
    assert achieved == pytest.approx(0.5, rel=0.03)
    analytic = outcome.notes["analytic_macs"]
    assert analytic["target"] == pytest.approx(0.5 * analytic["dense"])
    assert analytic["achieved_ratio"] == pytest.approx(0.5, rel=0.05)


def test_deterministic_under_a_seed():
    def once():
        method = create_method("ofb")
        ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=8)
        outcome = method.run(ctx)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return outcome.structure, outcome.model.eval()(x)

    (s1, y1), (s2, y2) = once(), once()
    assert s1 == s2 and torch.equal(y1, y2)


@pytest.mark.parametrize("args", [{"pmim": False}, {"one_hot_loss": False}, {"lambda_schedule": "importance_only"},
                                  {"lambda_schedule": "sparsity_only"}, {"search_embed": False},
                                  {"attn_mode": "heads_only", "pmim_schedule": "fixed"}])
def test_ablations_run_and_export_exactly(args):
    method = create_method("ofb", **args)
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=4)
    outcome = method.run(ctx)
    assert outcome.notes["export_max_abs_error"] < 1e-5
    assert ("decoder" in str(outcome.notes)) and (outcome.notes["training_macs"]["decoder_forward_macs_per_sample"]
                                                  == (0 if args.get("pmim") is False else 16 * 64 * 48))
    if args.get("search_embed") is False:
        assert outcome.model.embed_dim == 64


def test_cnn_is_a_clear_error():
    method = create_method("ofb")
    assert not method.supports(create_model("resnet20_tiny", img_size=16), "cnn")
    ctx = make_context("resnet20_tiny", "flops=0.5", method, budget=2)
    with pytest.raises(SpecError, match="VisionTransformer"):
        method.run(ctx)


def test_tiny_run_end_to_end_through_the_pipeline(tmp_path):
    from sparsebench.runners.pipeline import RunOptions, execute

    record = execute(tiny_spec("ofb", model="vit_cifar_tiny", target="flops=0.5"), RunOptions(out=tmp_path))
    assert record.granularity == "head" and record.realization.realizable
    assert record.structure["summary"]["embed_dim"] is not None
    assert 0.3 < record.achieved_flops_ratio < 0.8
    assert record.notes["training_macs"]["extra_forward_macs"] > 0
    assert record.cost.method_steps == record.notes["search_steps"] + record.notes["steps_after_search"]


def test_a_search_cut_short_settles_under_the_flops_target():
    """budget_choice: argmax cells over the target are stepped down until the analytic MACs fit,
    then stepped up while they still fit; every group ends on one of its live cells."""
    torch.manual_seed(0)
    model = create_model("vit_cifar_tiny", num_classes=10, img_size=16)
    method = create_method("ofb")
    masks = ViTWidthMasks(model)
    groups = method.build_groups(model, "cpu", torch.Generator().manual_seed(0))
    with torch.no_grad():
        for grp in groups:
            grp.alpha.copy_((grp.cells[:, 0] * grp.cells[:, 1]).float())   # argmax: the widest cell
    probe = BiMaskSearch(model, masks, groups, method.config, 10, 0.0, (3, 16, 16))
    for target in (0.5, 0.3):
        search = BiMaskSearch(model, masks, groups, method.config, 10, target * probe.dense_macs, (3, 16, 16))
        choice = search.budget_choice(groups)
        macs = search._macs_with(choice)
        assert macs <= search.target_macs
        assert macs >= (target - 0.05) * search.dense_macs          # and not far below it
        assert all(bool(g.active[choice[id(g)]]) for g in groups)
    masks.remove()


# --- the mechanism: S learns, groups settle by elimination, the null control does neither ------
@pytest.fixture(scope="module")
def searched():
    """A search long enough for groups to settle by elimination on the tiny ViT (60 steps; the
    quick suite's default is search_epochs 5, 95 steps at batch 64)."""
    method = create_method("ofb")
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=60)
    return method.run(ctx), ctx


def test_kept_units_are_not_the_top_k_of_the_initial_scores(searched):
    outcome, _ = searched
    metrics = outcome.mechanism.metrics
    # some group keeps a unit that the top-k of its random initial S would have dropped
    assert metrics["kept_overlap_initial_topk_overall"] < 0.95
    assert min(metrics["kept_overlap_initial_topk"].values()) < 0.95
    # S re-ranked in every group, not only nudged
    assert metrics["spearman_S_max"] < 0.95


def test_mechanism_telemetry_is_present_and_consistent(searched):
    outcome, ctx = searched
    mech, metrics, notes = outcome.mechanism, outcome.mechanism.metrics, outcome.notes
    assert mech.declared and not mech.control
    assert metrics["groups"] == len(notes["groups"]) == 9
    assert metrics["eliminated_groups"] + metrics["forced_groups"] == metrics["groups"]
    assert metrics["forced_groups"] == notes["forced_groups"] == sum(g["forced"] for g in notes["groups"])
    assert metrics["eliminated_fraction"] == pytest.approx(metrics["eliminated_groups"] / metrics["groups"], abs=1e-4)
    assert set(metrics["spearman_S"]) == set(metrics["kept_overlap_initial_topk"]) == {
        f"{g['kind']}{'' if g['block'] is None else g['block']}" for g in notes["groups"]}
    assert metrics["spearman_S_min"] <= metrics["spearman_S_mean"] <= metrics["spearman_S_max"] <= 1.0
    assert all(0.0 <= v <= 1.0 for v in metrics["kept_overlap_initial_topk"].values())
    assert metrics["search_steps"] == notes["search_steps"] <= metrics["search_max_steps"] == 60
    assert metrics["flops_ratio_target"] == 0.5
    assert metrics["flops_ratio_achieved"] == pytest.approx(notes["analytic_macs"]["achieved_ratio"], abs=1e-4)
    # the verdict follows the declared thresholds
    acted = (metrics["eliminated_fraction"] >= 0.5 and metrics["spearman_S_max"] <= 0.9
             and metrics["kept_overlap_initial_topk_overall"] <= 0.95)
    assert metrics["kept_overlap_chance_overall"] < 1.0
    assert mech.acted == acted and set(mech.thresholds) == set(OFB.mechanism_thresholds)
    # every elimination is a curve event; groups that finalised by elimination have a "final" one
    events = ctx.curve.events_of("eliminate")
    assert len(events) == len(notes["events"])
    finals = {e["group"] for e in events if e["final"]}
    assert len(finals) == metrics["eliminated_groups"]


def test_null_control_keeps_scores_and_logits_at_their_initialisation(monkeypatch):
    method = create_method("ofb", search=False)
    assert method.is_control and OFB.null_control == {"search": False}
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=12)
    seen = {}
    build = OFB.build_groups

    def spy(self, *args):
        seen["groups"] = build(self, *args)
        seen["init"] = [(g.S.detach().clone(), g.alpha.detach().clone()) for g in seen["groups"]]
        return seen["groups"]

    monkeypatch.setattr(OFB, "build_groups", spy)
    outcome = method.run(ctx)
    for g, (S, alpha) in zip(seen["groups"], seen["init"]):
        assert torch.equal(g.S.detach(), S) and torch.equal(g.alpha.detach(), alpha)
    metrics = outcome.mechanism.metrics
    assert outcome.mechanism.control and not outcome.mechanism.acted
    assert metrics["eliminated_groups"] == 0 and metrics["forced_groups"] == 9
    assert metrics["spearman_S_min"] == 1.0 and metrics["kept_overlap_initial_topk_overall"] == 1.0
    assert outcome.notes["search_steps"] == 12                     # the same budget, spent on the weights
    assert outcome.notes["export_max_abs_error"] < 1e-5


def test_score_lr_rule_scales_with_the_search_length():
    from sparsebench.methods.ofb import score_lr_rule
    assert score_lr_rule(95, 0.05) == 0.05                           # clipped at our budgets
    assert score_lr_rule(25040, 0.05) == pytest.approx(1e-3)          # the official schedule: 1e-3
    assert score_lr_rule(2000, 0.05) == pytest.approx(1e-3 * 25040 / 2000)


def test_a_search_cap_over_the_budget_is_said_and_recorded(caplog):
    import logging

    method = create_method("ofb", max_search_steps=500)
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=6)
    with caplog.at_level(logging.WARNING, logger="sparsebench"):
        outcome = method.run(ctx)
    said = "max_search_steps 500 > the step budget 6 (recipe search_epochs): the search gets 6 steps"
    assert ctx.adjustments == [{"setting": "max_search_steps", "given": 500, "used": 6, "why": said}]
    assert [r.getMessage() for r in caplog.records if "max_search_steps" in r.getMessage()] == [
        f"sparsebench: warning: {said}"]
    assert outcome.mechanism.metrics["search_max_steps"] == 6


def _task_loss_gradients(final=False, **args):
    """S's and the weights' gradients of the task loss alone (CE through the bi-masked model); `final`:
    with every group finalised (its search over)."""
    method = create_method("ofb", **args)
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method, budget=5)
    torch.manual_seed(0)
    model = ctx.model
    masks = ViTWidthMasks(model)
    groups = method.build_groups(model, "cpu", torch.Generator().manual_seed(0))
    search = BiMaskSearch(model, masks, groups, method.config, 2, 0.0, ctx.input_size)
    for g in groups if final else ():
        g.final = True
    x, y = next(iter(ctx.train_loader))
    search.set_masks(0.5)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [None if g.S.grad is None else g.S.grad.clone() for g in groups]
    alpha = [None if g.alpha.grad is None else g.alpha.grad.clone() for g in groups]
    weight = model.blocks[0].mlp.fc1.weight.grad.clone()
    masks.remove()
    return method, grads, alpha, weight


def test_the_task_loss_cut_signal_control_leaves_scores_without_the_task_gradient():
    """`task_loss_to_scores=False`: the same bi-mask in the forward, but the task loss reaches
    neither S nor α; the weights get the same gradient as in the real search."""
    from sparsebench.methods.base import config_dict

    real, s_real, a_real, w_real = _task_loss_gradients()
    cut, s_cut, a_cut, w_cut = _task_loss_gradients(task_loss_to_scores=False)
    assert all(g is not None and g.abs().sum() > 0 for g in s_real)
    assert any(g is not None and g.abs().sum() > 0 for g in a_real)
    assert all(g is None for g in s_cut) and all(g is None for g in a_cut)
    assert torch.allclose(w_real, w_cut)
    assert cut.signal_control == "task loss cut" and real.signal_control is None
    assert "task_loss_to_scores" not in config_dict(real.config)
    # a finalised group's mask is a learned per-unit scale (folded into the weights at export): the
    # control keeps learning it from the task loss, as the method does
    final_real, final_cut = _task_loss_gradients(final=True)[1], _task_loss_gradients(
        final=True, task_loss_to_scores=False)[1]
    assert all(c is not None and torch.allclose(r, c) for r, c in zip(final_real, final_cut))


def test_the_layer_shuffle_sanity_check_keeps_each_groups_widths_at_random_units(short_run):
    """`sanity="shuffle"`: the same search (same seed), then the kept heads, dims, neurons and
    channels drawn at random within each group; the widths, hence the MACs, are the search's."""
    from sparsebench.methods.ofb import SearchGroup, shuffle_group

    outcome, _ = short_run
    method = create_method("ofb", sanity="shuffle")
    assert method.signal_control == "layer-shuffled masks"
    shuffled = method.run(make_context("vit_cifar_tiny", "flops=0.5", method, budget=12))
    assert shuffled.notes["sanity"]["check"] == "shuffle"
    found, drawn = outcome.structure["blocks"], shuffled.structure["blocks"]
    assert [len(b["heads"]) for b in found] == [len(b["heads"]) for b in drawn]
    assert [len(b["mlp"]) for b in found] == [len(b["mlp"]) for b in drawn]
    assert sorted(map(len, sum((b["head_dims"] or [] for b in found), []))) == \
        sorted(map(len, sum((b["head_dims"] or [] for b in drawn), [])))
    assert found != drawn
    assert shuffled.notes["analytic_macs"]["achieved"] == outcome.notes["analytic_macs"]["achieved"]
    assert shuffled.notes["export_max_abs_error"] < 1e-4
    # one group: rows and each row's columns permuted, the learned score travelling with its unit
    g = SearchGroup("attn", 0, (4, 3), [(4, 3)], torch.Generator().manual_seed(0), "cpu")
    g.alive = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], dtype=torch.bool)
    before = sorted(float(v) for v in g.S.detach()[g.alive])
    shuffle_group(g, torch.Generator().manual_seed(1))
    assert sorted(int(n) for n in g.alive.sum(1)) == [0, 1, 2, 3]
    assert sorted(float(v) for v in g.S.detach()[g.alive]) == before

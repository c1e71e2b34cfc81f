"""PASS (reconstruction): budget, exact straight-through masks equal to the compacted model,
gradients only into the search variables, coupling, determinism, ablations, transfer (also
across architectures with quantile statistics), forward-order recurrence, a search that moves
the selection off the prior, the null control, adaptive BN, and the tiny configuration
through the real pipeline."""
import dataclasses

import pytest
import torch

from sparsebench.errors import SpecError
from sparsebench.measure.flops import count_macs
from sparsebench.methods import create_method
from sparsebench.methods.pass_ import MaskedPromptSearch, PASS, recalibrate_bn, units_changed, weight_statistics
from sparsebench.training.channels import ChannelSpace

from conftest import make_context, randomize_norms, tiny_spec


def run_pass(model="resnet20_tiny", flops=0.5, budget=4, seed=0, **args):
    method = create_method("pass", **args)
    ctx = make_context(model, f"flops={flops}", method, seed=seed, budget=budget)
    return method, ctx, method.run(ctx)


def search_pieces(model="resnet20_tiny", flops=0.5, **args):
    """The search as `PASS.run` builds it, before any step: (ctx, space, search, gates, hook)."""
    method = create_method("pass", **args)
    ctx = make_context(model, f"flops={flops}", method)
    randomize_norms(ctx.model)
    ctx.model.eval()
    for p in ctx.model.parameters():
        p.requires_grad_(False)
    cfg = method.config
    space = ChannelSpace(ctx.model, ctx.input_size, cfg.residual_mode)
    search = method.build(ctx, space)
    gates = space.gate(ctx.model)
    hook = MaskedPromptSearch(search, space, gates, flops, cfg.scope, cfg.min_channels, cfg.ste_temperature,
                              cfg.lambda_flops)
    return method, ctx, space, search, gates, hook


@pytest.mark.parametrize("model, mode, flops", [
    ("resnet20_tiny", "internal", 0.5), ("resnet20_tiny", "coupled", 0.5), ("resnet20_tiny", "coupled", 0.3),
    ("vgg16_bn_tiny", "internal", 0.3), ("mobilenet_v2_tiny", "coupled", 0.5), ("resnet18_tiny", "coupled", 0.3)])
def test_budget_met_by_the_independent_counter(model, mode, flops):
    _, ctx, outcome = run_pass(model, flops, residual_mode=mode)
    achieved = count_macs(outcome.model, ctx.input_size).macs / ctx.dense_macs
    assert flops - 0.02 <= achieved <= flops
    assert abs(outcome.notes["closed_form_flops_ratio"] - achieved) <= 0.01 * achieved
    assert outcome.realization == "compacted" and outcome.notes["faithfulness"] == "reconstruction"
    assert outcome.notes["residual_mode"] == mode
    assert all(g["kept"] >= 1 for g in outcome.structure["groups"])


def test_lower_target_never_gives_more_flops():
    ratios = [run_pass(flops=f, budget=0)[2].notes["closed_form_flops_ratio"] for f in (0.7, 0.5, 0.3)]
    assert ratios[0] >= ratios[1] >= ratios[2]


@pytest.mark.parametrize("model, mode", [("resnet20_tiny", "internal"), ("resnet20_tiny", "coupled"),
                                         ("vgg16_bn_tiny", "coupled")])
def test_straight_through_masks_are_binary_and_equal_the_compacted_model(model, mode):
    _, ctx, space, search, gates, hook = search_pieces(model, residual_mode=mode)
    values = hook.masks()
    gates.set(values)
    assert all(set(v.detach().unique().tolist()) <= {0.0, 1.0} for v in values)
    assert all(int(k.sum()) >= 1 for k in hook.last_masks)
    x = torch.randn(8, *ctx.input_size)
    with torch.no_grad():
        gated = ctx.model(x)
    gates.remove()
    compact = space.compact(ctx.model, hook.last_masks).eval()
    with torch.no_grad():
        assert (gated - compact(x)).abs().max() < 1e-5


def test_gradients_reach_hypernetwork_encoder_and_prompt_not_backbone():
    method, ctx, space, search, gates, hook = search_pieces(residual_mode="coupled")
    bn_before = {n: b.clone() for n, b in ctx.model.named_buffers()}
    trainer = ctx.make_trainer(ctx.model, hooks=[hook], param_groups=[{"params": list(search.parameters())}],
                               train_model_params=False, model_mode="eval",
                               recipe=dataclasses.replace(ctx.recipe, optimizer="adamw"), lr=1e-3)
    trainer.restart_schedule(1)
    trainer.train_step()
    gates.remove()
    grads = {n: p.grad for n, p in search.named_parameters()}
    for prefix in ("prompt.prompt", "encoder.", "hypernet.cell.", "hypernet.embed.", "hypernet.heads.",
                   "hypernet.offsets.", "hypernet.previous."):
        picked = [g for n, g in grads.items() if n.startswith(prefix)]
        assert picked and all(g is not None and g.norm() > 0 for g in picked), prefix
    prompt = search.prompt
    interior = prompt.prompt.grad[:, prompt.pad:-prompt.pad, prompt.pad:-prompt.pad]
    assert interior.abs().sum() == 0 and prompt.prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in ctx.model.parameters())
    assert all(torch.equal(b, bn_before[n]) for n, b in ctx.model.named_buffers())


def test_prompted_pixels_stay_in_unit_range():
    _, ctx, _, search, gates, _ = search_pieces()
    gates.remove()
    with torch.no_grad():
        search.prompt.prompt.normal_(0, 3.0)
    x = next(iter(ctx.train_loader))[0]
    pixels = search.prompt.pixels(x)
    assert pixels.min() >= 0 and pixels.max() <= 1
    # outside the border the prompted input is the input
    p = search.prompt.pad
    assert torch.allclose(search.prompt(x)[..., p:-p, p:-p], x[..., p:-p, p:-p], atol=1e-5)


def test_coupled_group_members_share_one_mask():
    _, ctx, space, search, gates, hook = search_pieces(residual_mode="coupled")
    gates.set(hook.masks())
    shared = [g for g in space.groups if len(g.mask_points) > 1]
    assert shared, "resnet20_tiny has residual streams with several producers"
    seen = {}
    handles = [ctx.model.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: seen.__setitem__(p, o.detach().abs().sum(dim=(0, 2, 3)) > 0))
        for g in shared for p in g.mask_points]
    with torch.no_grad():
        ctx.model(torch.randn(4, *ctx.input_size))
    for h in handles:
        h.remove()
    gates.remove()
    for g in shared:
        kept = hook.last_masks[g.index]
        for p in g.mask_points:
            assert torch.equal(seen[p], kept), p


def test_same_seed_same_masks_and_logits():
    outs = [run_pass(residual_mode="coupled", seed=3)[1:] for _ in range(2)]
    (ctx_a, a), (_, b) = outs
    assert a.structure == b.structure
    x = torch.randn(4, *ctx_a.input_size)
    with torch.no_grad():
        assert torch.equal(a.model.eval()(x), b.model.eval()(x))


@pytest.mark.parametrize("args", [{"use_prompt": False}, {"recurrent": False}, {"scope": "uniform"},
                                  {"feedback": False}, {"stats": "all"}, {"stats": "quantile"},
                                  {"init_bias_from_stats": False}, {"prior_final": 0.0}, {"bn_every": 0},
                                  {"lambda_flops": 1.0}])
def test_ablations_run_and_meet_budget(args):
    _, ctx, outcome = run_pass(residual_mode="coupled", budget=3, **args)
    achieved = count_macs(outcome.model, ctx.input_size).macs / ctx.dense_macs
    assert 0.48 <= achieved <= 0.5
    assert outcome.notes["search_steps"] == 3


def test_soft_flops_estimate_is_the_closed_form_and_differentiable():
    _, ctx, space, _, gates, hook = search_pieces(residual_mode="coupled")
    gates.remove()
    counts = [3] * len(space.groups)
    soft = [torch.tensor(3.0, requires_grad=True) for _ in space.groups]
    value = space.macs(soft)
    assert float(value.detach()) == space.macs(counts)
    value.backward()
    assert all(s.grad is not None and s.grad > 0 for s in soft)


def test_keep_prompt_stays_as_an_input_op_outside_macs():
    _, ctx, kept = run_pass(residual_mode="coupled", keep_prompt=True)
    _, _, plain = run_pass(residual_mode="coupled")
    assert hasattr(kept.model, "input_prompt") and not hasattr(plain.model, "input_prompt")
    assert count_macs(kept.model, ctx.input_size).macs == count_macs(plain.model, ctx.input_size).macs
    op = kept.notes["prompt_input_op"]
    assert kept.notes["keep_prompt"] and op["counted_in_macs"] is False and op["additions_per_image"] == 3 * 16 * 16
    x = torch.randn(2, *ctx.input_size)
    with torch.no_grad():           # the attached prompt is the searched one, applied before the backbone
        bare = kept.model.input_prompt(x)
        assert not torch.equal(bare, x) or kept.model.input_prompt.prompt.abs().sum() == 0


def test_transfer_save_load_round_trips(tmp_path):
    path = str(tmp_path / "hyper.pt")
    method, _, first = run_pass(residual_mode="coupled", save_hypernet=path)
    saved = torch.load(path, weights_only=True)
    assert saved["found_on"] == {"model": "resnet20_tiny", "dataset": "digits"}
    # another dense model of the same architecture starts its search from the saved hypernetwork
    loader = create_method("pass", residual_mode="coupled", init_hypernet_from=path)
    ctx = make_context("resnet20_tiny", "flops=0.5", loader, seed=1)
    space = ChannelSpace(ctx.model, ctx.input_size, "coupled")
    search = loader.build(ctx, space)
    loader.load(path, space, search)
    assert all(torch.equal(v, saved["state"][k]) for k, v in search.state_dict().items())
    outcome = create_method("pass", residual_mode="coupled", init_hypernet_from=path).run(
        make_context("resnet20_tiny", "flops=0.5", loader, seed=1, budget=2))
    assert outcome.notes["init_hypernet_from"]["path"] == path


def test_transfer_to_another_architecture_is_one_clear_error(tmp_path):
    path = str(tmp_path / "hyper.pt")
    run_pass(residual_mode="coupled", save_hypernet=path, budget=0)
    method = create_method("pass", residual_mode="coupled", init_hypernet_from=path)
    with pytest.raises(SpecError, match="architecture mismatch in groups") as e:
        method.run(make_context("vgg16_bn_tiny", "flops=0.5", method))
    assert "\n" not in str(e.value)
    missing = create_method("pass", init_hypernet_from=str(tmp_path / "nope.pt"))
    with pytest.raises(SpecError, match="no such file"):
        missing.run(make_context("resnet20_tiny", "flops=0.5", missing))


def test_vit_is_refused_with_one_line():
    method = create_method("pass")
    ctx = make_context("vit_cifar_tiny", "flops=0.5", method)
    assert not method.supports(ctx.model, "vit") and method.supports(ctx.model, "cnn")
    with pytest.raises(SpecError, match="CNNs only") as e:
        method.run(ctx)
    assert "\n" not in str(e.value)


def test_target_below_the_floor_is_one_clear_error():
    with pytest.raises(SpecError, match="below the floor"):
        run_pass(flops=0.05, residual_mode="internal")


def test_tiny_configuration_runs_end_to_end(tmp_path):
    from sparsebench.runners.pipeline import RunOptions, execute

    record = execute(tiny_spec("pass", target="flops=0.5"), RunOptions(out=tmp_path))
    assert 0.48 <= record.achieved_flops_ratio <= 0.5
    assert record.notes["faithfulness"] == "reconstruction"
    assert record.notes["search_steps"] == record.cost.method_budget_steps > 0
    assert record.mechanism.declared and not record.mechanism.control
    assert record.mechanism.metrics["search_steps"] == record.notes["search_steps"]
    curve = record.curves["method"]
    recalibrations = [e for e in curve["events"] if e[1] == "bn_recalibration"]
    assert len(recalibrations) == len(curve["values"]["masked_val_top1"]) == record.notes["bn_recalibrations"] > 0


def test_the_lstm_steps_through_the_units_in_forward_order():
    _, ctx, space, search, gates, _ = search_pieces("vgg16_bn_tiny", residual_mode="coupled")
    gates.remove()
    order = space.forward_order()
    assert search.order == order and order != list(range(len(order)))   # VGG: torch-pruning lists it backwards
    first = order[0]
    assert space.groups[first].root == "features.0"
    stats = weight_statistics(ctx.model, space, "l2")
    # the LSTM's first step reads the first layer's statistics, its last step the last layer's
    assert torch.equal(search.hypernet.stats_0, stats[first].flatten().float())
    last = len(order) - 1
    assert torch.equal(getattr(search.hypernet, f"stats_{last}"), stats[order[-1]].flatten().float())
    assert [s.shape[0] for s in search.scores()] == [g.size for g in space.groups]   # handed back in group order


def test_search_starts_at_the_prior_and_moves_off_it():
    """The learned part starts near 0 (the prior's selection), and a short search changes the
    selection: this fails if the search leaves the channels equal to the prior's."""
    method, ctx, outcome = run_pass(residual_mode="coupled", budget=10, bn_every=5, bn_batches=1)
    m = outcome.mechanism.metrics
    assert m["search_steps"] == outcome.notes["search_steps"] == 10
    assert m["units_changed"] > 0 and m["score_change_mean"] > 0.05
    assert 0 < m["units_changed_fraction"] <= 1 and m["score_change_max"] >= m["score_change_mean"]
    assert m["prompt_norm"] > 0 and len(m["masked_val_top1_during"]) == 2
    assert outcome.mechanism.declared and not outcome.mechanism.control
    # at step 0 the selection is the prior's: the initial learned part is too small to reorder channels
    _, ctx0, space, search, gates, hook = search_pieces(residual_mode="coupled")
    gates.remove()
    prior = [s[:, 0] for s in weight_statistics(ctx0.model, space, "l2")]
    hook.masks()
    assert units_changed(hook.last_masks, space.select(prior, 0.5, scope="global")) == 0


def test_null_control_is_the_prior_alone_without_search_steps():
    method, ctx, outcome = run_pass(residual_mode="coupled", budget=6, search=False)
    assert method.is_control and create_method("pass").null_control == {"search": False}
    assert outcome.notes["search_steps"] == 0 and ctx.budget.used == 0
    space = ChannelSpace(ctx.model, ctx.input_size, "coupled")
    prior = [s[:, 0] for s in weight_statistics(ctx.model, space, "l2")]
    kept = space.select(prior, 0.5, scope="global")
    assert [g["kept"] for g in outcome.structure["groups"]] == [int(k.sum()) for k in kept]
    assert outcome.mechanism.control and outcome.mechanism.metrics["units_changed"] == 0


def test_adaptive_bn_recalibrates_from_forwards_only_and_the_run_restores_dense_statistics():
    _, ctx, space, search, gates, hook = search_pieces(residual_mode="coupled")
    weights = {n: p.clone() for n, p in ctx.model.named_parameters()}
    x = next(iter(ctx.train_loader))[0]
    seen = {}
    handle = ctx.model.bn1.register_forward_hook(lambda m, i, o: seen.__setitem__("in", i[0].detach()))
    assert recalibrate_bn(ctx.model, [x]) == len(x)
    handle.remove()
    gates.remove()
    assert not ctx.model.training
    assert torch.allclose(ctx.model.bn1.running_mean, seen["in"].mean(dim=(0, 2, 3)), atol=1e-5)
    assert all(torch.equal(p, weights[n]) for n, p in ctx.model.named_parameters())
    # a whole run recalibrates (events, counted MACs) but hands back the dense BN statistics
    method = create_method("pass", residual_mode="coupled", bn_every=2, bn_batches=1)
    ctx = make_context("resnet20_tiny", "flops=0.5", method, budget=4)
    before = {n: b.clone() for n, b in ctx.model.named_buffers()}
    outcome = method.run(ctx)
    events = ctx.curve.events_of("bn_recalibration")
    assert len(events) == 2 == outcome.notes["bn_recalibrations"]
    assert all(torch.equal(b, before[n]) for n, b in ctx.model.named_buffers())
    frozen = create_method("pass", residual_mode="coupled", bn_every=0)
    ctx0 = make_context("resnet20_tiny", "flops=0.5", frozen, budget=4)
    frozen.run(ctx0)
    images = sum(e["images"] for e in events)
    assert images == 2 * 64 and ctx.compute.forward > ctx0.compute.forward


def test_quantile_statistics_pool_to_a_fixed_size_and_transfer_across_architectures(tmp_path):
    from sparsebench.methods.pass_ import QUANTILES, quantile_pool

    x = torch.tensor([[3.0], [1.0], [2.0], [0.0], [4.0]])
    pooled = quantile_pool(x, 5)
    assert torch.allclose(pooled, torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0]))       # sorted quantiles
    path = str(tmp_path / "hyper.pt")
    _, _, first = run_pass(residual_mode="coupled", stats="quantile", save_hypernet=path, budget=2)
    saved = torch.load(path, weights_only=True)
    assert saved["signature"]["groups"] is None
    assert not any("offsets" in k for k in saved["state"])
    # every shared piece is independent of the layer widths: the VGG's search loads it as it is
    method = create_method("pass", residual_mode="coupled", stats="quantile", init_hypernet_from=path)
    ctx = make_context("vgg16_bn_tiny", "flops=0.5", method, budget=2)
    space = ChannelSpace(ctx.model, ctx.input_size, "coupled")
    search = method.build(ctx, space)
    method.load(path, space, search)
    assert all(torch.equal(v, saved["state"][k]) for k, v in search.state_dict().items())
    assert search.hypernet.embed.in_features == 3 * QUANTILES
    outcome = method.run(ctx)
    assert outcome.notes["init_hypernet_from"]["model"] == "resnet20_tiny"


def test_the_shuffled_label_signal_control_permutes_the_search_targets(monkeypatch):
    """`labels="shuffled"`: every search step's loss sees the batch's labels permuted (same class
    counts, another pairing with the images); the default search sees them as given."""
    seen = {}
    forward = MaskedPromptSearch.before_forward

    def spy(self, trainer, inputs, targets):
        prompted, used = forward(self, trainer, inputs, targets)
        seen.setdefault(self.shuffle_labels is not None, []).append((targets.clone(), used.clone()))
        return prompted, used

    monkeypatch.setattr(MaskedPromptSearch, "before_forward", spy)
    run_pass(budget=3)
    run_pass(budget=3, labels="shuffled")
    assert all(torch.equal(given, used) for given, used in seen[False]) and len(seen[False]) == 3
    assert len(seen[True]) == 3
    for given, used in seen[True]:
        assert torch.equal(given.sort().values, used.sort().values)
    assert any(not torch.equal(given, used) for given, used in seen[True])


def test_the_shuffled_label_search_runs_is_marked_and_keeps_spec_hashes():
    from sparsebench.methods.base import config_dict

    method, ctx, outcome = run_pass(budget=4, labels="shuffled")
    m = outcome.mechanism
    assert m.signal_control == "shuffled labels" and m.label == "signal control"
    real = create_method("pass")
    assert real.signal_control is None and "labels" not in config_dict(real.config)
    assert create_method("pass").signal_controls["shuffled labels"] == {"labels": "shuffled"}


def test_the_layer_shuffle_sanity_check_keeps_the_searched_widths_at_other_channels(monkeypatch):
    """`sanity="shuffle"`: the same search (seeded alike), then every group keeps as many channels
    as the search chose, drawn at random; the structure's positions differ."""
    from sparsebench.methods.base import config_dict

    _, _, real = run_pass(budget=3)
    method, _, shuffled = run_pass(budget=3, sanity="shuffle")
    assert method.signal_control == "layer-shuffled masks" and shuffled.mechanism.signal_control == method.signal_control
    assert shuffled.notes["sanity"]["check"] == "shuffle" and "sanity" not in config_dict(create_method("pass").config)
    assert real.structure == shuffled.structure                               # the same per-group counts
    pairs = list(zip(real.model.parameters(), shuffled.model.parameters()))
    assert all(a.shape == b.shape for a, b in pairs)
    assert any(not torch.equal(a, b) for a, b in pairs)                       # other channels' weights


def test_budget_ramp_lets_the_masks_meet_a_budget_falling_from_one_to_the_target(monkeypatch):
    """`budget_ramp=0.5`: the masks of step t meet 1 − (1 − ρ)·t/(0.5·(T − 1)), then ρ; extraction
    meets ρ; `budget_ramp=1`: the last search step meets ρ; the default stays out of spec hashes."""
    ratios = []
    forward = MaskedPromptSearch.before_forward

    def spy(self, trainer, inputs, targets):
        out = forward(self, trainer, inputs, targets)
        ratios.append(round(self.flops_ratio, 4))
        return out

    monkeypatch.setattr(MaskedPromptSearch, "before_forward", spy)
    method, ctx, out = run_pass(flops=0.3, budget=6, budget_ramp=0.5)
    assert ratios == [1.0, round(1 - 0.7 * 0.4, 4), round(1 - 0.7 * 0.8, 4), 0.3, 0.3, 0.3]
    assert out.notes["closed_form_flops_ratio"] <= 0.3
    ratios.clear()
    run_pass(flops=0.3, budget=3)
    assert ratios == [0.3, 0.3, 0.3]
    ratios.clear()
    run_pass(flops=0.3, budget=3, budget_ramp=1.0)
    assert ratios == [1.0, 0.65, 0.3]
    with pytest.raises(ValueError, match="budget_ramp"):
        create_method("pass", budget_ramp=1.5)
    from sparsebench.runners.pipeline import resolve

    plain = resolve(tiny_spec("pass", target="flops=0.5"))
    assert resolve(tiny_spec("pass", target="flops=0.5", method_args={"budget_ramp": 0.0})).hash == plain.hash
    assert "budget_ramp" not in dict(plain.method_args)
    assert resolve(tiny_spec("pass", target="flops=0.5", method_args={"budget_ramp": 0.5})).hash != plain.hash


def test_a_search_on_a_network_at_chance_says_so_in_its_verdict():
    from sparsebench.methods.pass_ import at_chance_note

    assert "at chance" in at_chance_note({"masked_val_top1_prior": 0.15}, 10, steps=38)
    assert at_chance_note({"masked_val_top1_prior": 0.45}, 10, steps=38) == ""
    assert at_chance_note({"masked_val_top1_prior": 0.15}, 10, steps=0) == ""      # the null control searched nothing
    assert at_chance_note({"masked_val_top1_prior": 0.15}, 10, steps=38, budget_ramp=0.5).startswith(
        "ended its search (budget_ramp) on a network at chance")

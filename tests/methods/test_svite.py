"""SViTE / S²ViTE / SViTE+ (sparsebench/methods/svite.py; spec §11)."""
import copy
import math

import pytest
import torch
from torch import nn

from sparsebench.errors import SpecError
from sparsebench.methods import create_method
from sparsebench.methods.svite import (
    UnitPruneAndGrow,
    TemperatureSchedule, TokenSelector, drop_fraction, insert_selector, is_update_step, selector_of,
    svite_initial_masks, svite_update_interval, unit_weight_masks,
)
from sparsebench.measure.flops import count_macs
from sparsebench.models import create_model
from sparsebench.runners.pipeline import RunOptions, execute
from sparsebench.training.importance import HeadOutputTaylor
from sparsebench.training.masks import DynamicSparsity, MaskSet, ShadowWeights, drop_and_grow, prunable_weights
from sparsebench.training.trainer import TrainerHook
from sparsebench.training.vit_slim import ViTStructure, slim_vit, vit_macs, vit_params
from sparsebench.training.vit_units import ViTUnitSpace

from conftest import make_context, set_fused_attention, tiny_spec


def vit(name="vit_cifar_tiny", img_size=16, seed=0):
    torch.manual_seed(seed)
    return create_model(name, num_classes=10, img_size=img_size)


def randomize_biases(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    for n, p in model.named_parameters():
        if n.endswith("bias"):
            p.data.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


# --- schedule ----------------------------------------------------------------------------------
def test_drop_fraction_endpoints_and_horizons():
    assert drop_fraction(0, 100) == pytest.approx(0.5)
    assert drop_fraction(100, 100) == pytest.approx(0.005)
    # official: decay over the whole run, ≈ 0.05 at t_end = 0.8
    assert drop_fraction(80, 100) == pytest.approx(0.005 + 0.495 * 0.5 * (1 + math.cos(0.8 * math.pi)))
    assert drop_fraction(80, 100, decay_over="t_end") == pytest.approx(0.005)


def test_update_interval_follows_the_official_one_percent_with_the_shared_minimums():
    # a 570-step ViT budget: 1 % is 6 steps, under the 10-step minimum -> every 10 steps, 45 updates
    every = svite_update_interval(570, 0.8, None, 0.01)
    assert every == 10
    steps = [t for t in range(571) if is_update_step(t, 570, every, 0.8)]
    assert len(steps) == 45 and max(steps) < 456
    # a long run keeps the official ≈1 % (≈80 updates over 0.8 of training)
    every = svite_update_interval(150_000, 0.8, None, 0.01)
    assert every == 1500 and len(range(every, 120_000, every)) == 79
    assert svite_update_interval(20, 0.8, None, 0.01) == 10            # ≥ 10 steps, one update fits
    assert svite_update_interval(300, 0.8, 4, 0.01) == 4               # an explicit interval is kept


# --- criteria on hand-built tensors ----------------------------------------------------------------
def test_prune_lowest_active_grow_highest_inactive():
    """SViTE's criteria through the shared RigL primitive (`drop_and_grow`)."""
    active = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)
    weight = torch.tensor([0.5, -0.1, 2.0, 9.0, 9.0, 9.0])          # inactive magnitudes are ignored
    grad = torch.tensor([9.0, 0.05, 9.0, 0.3, -3.0, 0.1])           # still-active gradients are ignored
    new = drop_and_grow(active, weight, grad.abs(), 1)
    assert new.tolist() == [True, False, True, False, True, False]
    # just-pruned entries are grow candidates
    new = drop_and_grow(active, weight, torch.tensor([0, 5.0, 0, 1, 1, 1]), 1)
    assert new.tolist() == [True, True, True, False, False, False]


def test_svite_update_grows_zero_weights_with_zeroed_adam_state_and_ceil_counts():
    lin = nn.Linear(8, 4, bias=False)
    opt = torch.optim.AdamW(lin.parameters(), lr=0.1)
    lin(torch.randn(4, 8)).sum().backward()
    opt.step()
    masks = MaskSet(lin, {"weight": torch.rand(4, 8, generator=torch.Generator().manual_seed(0)) < 0.5})
    masks.mask_optimizer_state(opt)
    before = masks.masks["weight"].clone()
    hook = DynamicSparsity(masks, delta_t=1, t_end=10, grow="gradient", rounding="ceil",
                           drop_fraction=lambda t: 0.01)
    moved = hook.update(1, opt, gradients={"weight": (~before).float() * torch.rand(4, 8)})
    after = masks.masks["weight"]
    new = after & ~before
    assert int(after.sum()) == int(before.sum())
    assert moved["weight"] == 1 == int(new.sum())                  # ⌈0.01·n⌉ = 1, not ⌊·⌋ = 0
    assert (lin.weight[new] == 0).all() and (opt.state[lin.weight]["exp_avg"][new] == 0).all()


# --- SViTE (unstructured) --------------------------------------------------------------------------
def test_erk_exact_density_and_dense_fallback():
    model = vit()
    params = prunable_weights(model)
    masks = svite_initial_masks(params, 0.5, "erk_exact", torch.Generator().manual_seed(0))
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept / total - 0.5) < 1e-3
    assert bool(masks["head.weight"].all())               # a 10-class head is made dense
    assert set(params) >= {"patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
                           "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"}


def test_svite_masks_hold_and_layer_counts_are_constant():
    method = create_method("svite", update_every=4)
    ctx = make_context("vit_cifar_tiny", "sparsity=0.5", method, budget=20)
    seen = []

    class Check(TrainerHook):
        order = 1000                                       # after MaskSet

        def __init__(self):
            self.masks = None

        def after_step(self, trainer):
            masks = next(h for h in trainer.hooks if hasattr(h, "masks") and isinstance(h.masks, dict))
            for n, p in masks.params.items():
                assert (p[~masks.masks[n]] == 0).all()
            seen.append(masks.nnz())

    outcome = method.train(ctx, method.config, hooks=[Check()])
    assert all(s == seen[0] for s in seen)
    steps = [u["step"] for u in outcome.notes["updates"]]
    assert steps == [4, 8, 12] and all(t < 0.8 * 20 for t in steps)
    assert all(u["moved"] > 0 for u in outcome.notes["updates"])
    assert outcome.masks.sparsity() == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("name,target,args", [
    ("svite", "sparsity=0.5", {}),
    ("s2vite", "flops=0.6", {}),
    ("svite-plus", "flops=0.6", {"base": "s2vite", "token_mode": "drop"}),
])
def test_same_seed_same_masks_and_logits(name, target, args):
    def run():
        method = create_method(name, update_every=3, **args)
        ctx = make_context("vit_cifar_tiny", target, method, budget=8)
        out = method.run(ctx)
        x = next(iter(ctx.val_loader))[0][:8]
        masks = out.masks.masks if out.masks is not None else out.structure
        return masks, out.model.eval()(x)

    (ma, la), (mb, lb) = run(), run()
    if isinstance(ma, dict) and all(isinstance(v, torch.Tensor) for v in ma.values()):
        assert all(torch.equal(ma[n], mb[n]) for n in ma)
    else:
        assert ma == mb
    assert torch.equal(la, lb)


# --- S²ViTE (heads + neurons) ----------------------------------------------------------------------
@pytest.mark.parametrize("fused", [False, True])
def test_head_scores_match_autograd_reference(fused):
    model = randomize_biases(vit())
    set_fused_attention(model, fused)
    capture = HeadOutputTaylor(model)
    x = torch.randn(3, 3, 16, 16)
    capture.arm()
    outs = {}
    handles = [blk.attn.proj.register_forward_pre_hook(
        lambda m, i, b=b: outs.__setitem__(b, i[0]) or i[0].retain_grad()) for b, blk in enumerate(model.blocks)]
    model(x).pow(2).sum().backward()
    for h in handles:
        h.remove()
    for b, blk in enumerate(model.blocks):
        H = blk.attn.num_heads
        a, g = outs[b].detach(), outs[b].grad
        a, g = a.view(3, a.shape[1], H, -1), g.view(3, g.shape[1], H, -1)
        ref_taylor = (a * g).sum(dim=(1, 3)).abs().mean(0)
        ref_grad = g.abs().sum(dim=(1, 3)).mean(0)
        assert torch.allclose(capture.taylor[b], ref_taylor, rtol=1e-4, atol=1e-7)
        assert torch.allclose(capture.grad_l1[b], ref_grad, rtol=1e-4, atol=1e-7)
    capture.remove()


def test_s2vite_counts_per_block_constant_and_export_equivalent():
    method = create_method("s2vite", update_every=4)
    ctx = make_context("vit_cifar_tiny", "flops=0.6", method, budget=20)
    counts = []

    class Check(TrainerHook):
        order = 1000

        def after_step(self, trainer):
            upd = next(h for h in trainer.hooks if hasattr(h, "neurons"))
            counts.append(([int(h.sum()) for h in upd.heads], [int(j.sum()) for j in upd.neurons]))
            for n, p in upd.masks.params.items():
                assert (p[~upd.masks.masks[n]] == 0).all()

    outcome = method.train(ctx, method.config, hooks=[Check()])
    h, m = outcome.notes["heads_per_block"], outcome.notes["mlp_per_block"]
    assert all(c == ([h] * 4, [m] * 4) for c in counts)
    assert [u["step"] for u in outcome.notes["updates"]] == [4, 8, 12]
    assert all(u["swapped"]["heads"] == 4 for u in outcome.notes["updates"])      # ⌈dr·2⌉ = 1 per block
    assert outcome.realization == "compacted"
    assert outcome.notes["compaction_max_abs_error"] < 1e-5
    assert outcome.structure["summary"]["heads"] == [h] * 4
    ratio = count_macs(outcome.model, ctx.input_size).macs / ctx.dense_macs
    assert ratio == pytest.approx(outcome.notes["closed_form_flops_ratio"]) and ratio <= 0.6


def test_export_equivalence_with_biases_and_an_empty_block(tmp_path):
    """Masked weights (qkv rows, fc1 rows, fc2 columns; biases live) == the slim timm ViT."""
    model = randomize_biases(vit()).eval()
    H, hidden = 4, 256
    g = torch.Generator().manual_seed(1)
    heads = [torch.tensor([1, 0, 1, 0], dtype=torch.bool), torch.zeros(H, dtype=torch.bool),
             torch.tensor([0, 0, 0, 1], dtype=torch.bool), torch.ones(H, dtype=torch.bool)]
    neurons = [torch.rand(hidden, generator=g) < 0.5 for _ in range(4)]
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for n, m in unit_weight_masks(masked, heads, neurons).items():
            masked.get_parameter(n).mul_(m)
    space = ViTUnitSpace(masked, (3, 16, 16))
    kept = [u for pair in zip(heads, neurons) for u in pair]
    slim = space.compact(masked, kept).eval()
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert (masked(x) - slim(x)).abs().max() < 1e-5
    structure = ViTStructure.from_dict(space.structure(kept))
    assert sum(p.numel() for p in slim.parameters()) == vit_params(model, structure)
    # reload: dense model → slim → load_state_dict of the saved slim weights
    torch.save(slim.state_dict(), tmp_path / "slim.pt")
    (tmp_path / "structure.json").write_text(structure.to_json())
    again = slim_vit(vit(seed=5), ViTStructure.from_json((tmp_path / "structure.json").read_text())).eval()
    again.load_state_dict(torch.load(tmp_path / "slim.pt"))
    with torch.no_grad():
        assert torch.equal(again(x), slim(x))


def test_s2vite_explicit_densities_and_floor():
    method = create_method("s2vite", head_density=0.5, mlp_density=0.5)
    ctx = make_context("vit_cifar_tiny", "flops=0.6", method, budget=4)
    out = method.run(ctx)
    assert out.structure["summary"]["heads"] == [2] * 4 and out.structure["summary"]["mlp"] == [128] * 4
    with pytest.raises(SpecError, match="keeps no head"):
        bad = create_method("s2vite", head_density=0.2)
        bad.run(make_context("vit_cifar_tiny", "flops=0.6", bad, budget=2))


def test_cnn_is_refused_in_one_line():
    for name in ("svite", "s2vite", "svite-plus"):
        method = create_method(name)
        assert not method.supports(create_model("resnet20_tiny", img_size=16), "cnn")
        with pytest.raises(SpecError, match="needs a timm VisionTransformer"):
            method.run(make_context("resnet20_tiny", "sparsity=0.5" if name != "s2vite" else "flops=0.5",
                                    method, budget=2))


# --- SViTE+ token selector ---------------------------------------------------------------------------
def _selected(x_out):
    return (x_out.abs().sum(-1) != 0)


@pytest.mark.parametrize("mode", ["mask", "drop"])
def test_selector_keeps_k_tokens_and_the_class_token(mode):
    torch.manual_seed(0)
    sel = TokenSelector(8, keep=5, num_prefix=1, mode=mode).train()
    x = torch.randn(16, 17, 8) + 0.1
    y = sel(x)
    if mode == "mask":
        kept = _selected(y).sum(1)
        assert ((kept == 5) | (kept == 6)).all()          # top-k over all tokens, then cls forced
        assert torch.equal(y[:, 0], x[:, 0])
    else:
        assert y.shape == (16, 5, 8)
        assert torch.equal(y[:, 0], x[:, 0])
        # each kept token is one of the input patch tokens
        dist = torch.cdist(y[:, 1:], x[:, 1:])
        assert (dist.min(-1).values < 1e-5).all()
    sel.eval()
    a, b = sel(x), sel(x)
    assert torch.equal(a, b)                               # eval: deterministic top-k (no noise)
    if mode == "drop":
        assert a.shape[1] == 5


@pytest.mark.parametrize("mode", ["mask", "drop"])
def test_gradients_reach_the_selector(mode):
    model = vit()
    sel = TokenSelector(model.embed_dim, 12, 1, mode)
    insert_selector(model, sel)
    model.train()
    model(torch.randn(4, 3, 16, 16)).sum().backward()
    assert sel.scorer.weight.grad is not None and sel.scorer.weight.grad.abs().sum() > 0


def test_temperature_endpoints():
    sel = TokenSelector(8, 4)
    sched = TemperatureSchedule(sel, total=100)
    assert sched.tau_at(0) == pytest.approx(10.0) and sched.tau_at(99) == pytest.approx(0.1)
    assert sel.tau == 10.0


def test_token_drop_macs_are_the_shorter_sequence():
    """count_macs of the drop-mode model == closed form at k tokens + patch embed at all + scorer."""
    model = vit().eval()
    n, k, D = 17, 9, model.embed_dim
    insert_selector(model, TokenSelector(D, k, 1, "drop"))
    got = count_macs(model, (3, 16, 16)).macs
    blocks_at_k = ViTUnitSpace(vit(), (3, 16, 16), tokens=k).dense_macs
    assert got == blocks_at_k + n * D
    # by hand for one block: qkv + QKᵀ + A·V + proj + fc1 + fc2 at k tokens
    per_block = k * D * 3 * D + 2 * k * k * D + k * D * D + 2 * k * D * 4 * D
    patch = 16 * 48 * D
    assert got == patch + 4 * per_block + D * 10 + n * D
    assert got < vit_macs(vit(), input_size=(3, 16, 16))


def test_svite_plus_records_mode_and_keep_and_is_excluded_from_masks():
    method = create_method("svite-plus", token_mode="drop", token_keep=0.9, update_every=4)
    ctx = make_context("vit_cifar_tiny", "sparsity=0.5", method, budget=10)
    out = method.run(ctx)
    assert out.realization == "compacted" and out.notes["token_mode"] == "drop" and out.notes["token_keep"] == 15
    assert not any("norm_pre" in n for n in out.masks.names())
    assert out.structure["token_selector"] == {"mode": "drop", "keep": 15, "of": 17, "after": "pos_embed (norm_pre)"}
    sel = selector_of(out.model)
    assert sel.tau == pytest.approx(0.1)
    assert method.target_kind == "sparsity"
    assert create_method("svite-plus", base="s2vite").target_kind == "flops"


# --- the real pipeline ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("svite-cache")


@pytest.mark.parametrize("method,target,args", [
    ("s2vite", "flops=0.6", {}),
    ("svite", "sparsity=0.5", {}),
    ("svite-plus", "sparsity=0.5", {"token_mode": "drop"}),
    ("svite-plus", "flops=0.6", {"base": "s2vite", "token_mode": "mask"}),
])
def test_pipeline_end_to_end(tmp_path, cache, method, target, args):
    spec = tiny_spec(method, model="vit_cifar_tiny", target=target, method_args=tuple(sorted(args.items())))
    record = execute(spec, RunOptions(out=tmp_path, cache_dir=cache))
    assert record.test_top1 > 0.1
    if method == "s2vite":
        assert record.realization.realizable and record.measured_speedup is not None
        assert record.achieved_flops_ratio <= 0.6 + 1e-9
    elif method == "svite":
        assert record.realization.realizable and record.realization.kind == "auto"
        assert record.achieved_sparsity == pytest.approx(0.5, abs=2e-3)
    elif args.get("token_mode") == "drop":
        assert record.realization.realizable and record.notes["token_mode"] == "drop"
        assert record.macs.realized < record.macs.dense
    else:
        assert record.notes["token_mode"] == "mask" and record.notes["faithful"]
        assert record.achieved_flops_ratio <= 0.6 + 1e-9


@pytest.mark.parametrize("name,heads", [("deit_tiny_tiny", 2), ("deit_small_tiny", 4)])
def test_s2vite_on_deit_layouts_headline_density(name, heads):
    """The `_60` layout: heads 0.7 (⌊3·0.7⌋ = 2 for DeiT-T, 4 of 6 for DeiT-S), MLP 0.6."""
    method = create_method("s2vite", head_density=0.7, mlp_density=0.6, update_every=2)
    ctx = make_context(name, "flops=0.6", method, budget=4)
    out = method.run(ctx)
    assert out.structure["summary"]["heads"] == [heads] * 2
    assert out.notes["compaction_max_abs_error"] < 1e-5


def test_svite_plus_on_s2vite_with_eval_noise_still_checks_export():
    method = create_method("svite-plus", base="s2vite", token_mode="drop", eval_noise=True, update_every=2)
    out = method.run(make_context("vit_cifar_tiny", "flops=0.6", method, budget=4))
    assert out.notes["compaction_max_abs_error"] < 1e-5 and selector_of(out.model).eval_noise
    assert out.notes["closed_form_flops_ratio"] <= 0.6


@pytest.mark.parametrize("args", [{"init": "erk_bernoulli"}, {"init": "uniform", "grow": "random"},
                                  {"decay_over": "t_end", "include_head": False, "include_patch_embed": False}])
def test_svite_ablation_switches_run(args):
    method = create_method("svite", update_every=2, **args)
    out = method.run(make_context("vit_cifar_tiny", "sparsity=0.5", method, budget=4))
    names = out.masks.names()
    assert ("head.weight" in names) == args.get("include_head", True)
    assert ("patch_embed.proj.weight" in names) == args.get("include_patch_embed", True)
    tol = 0.02 if args.get("init") == "erk_bernoulli" else 1e-3        # Bernoulli counts are inexact
    assert out.masks.sparsity() == pytest.approx(0.5, abs=tol)


def test_s2vite_random_growth_moves_units_and_keeps_counts():
    method = create_method("s2vite", grow="random", update_every=2, alpha=0.9)
    out = method.run(make_context("vit_cifar_tiny", "flops=0.6", method, budget=12))
    assert sum(u["moved"]["neurons"] for u in out.notes["updates"]) > 0
    assert out.structure["summary"]["mlp"] == [out.notes["mlp_per_block"]] * 4
    assert out.notes["compaction_max_abs_error"] < 1e-5


# --- the revival growth criterion (non-official ablation) ------------------------------------------
def test_unit_gate_gradients_equal_weight_times_gradient_of_the_consuming_columns():
    """Scaling input j of a Linear by g is scaling its column j, so ∂L/∂g = Σ_i W[i,j]·∂L/∂W[i,j]
    (a neuron); a head's gate blends from its v-bias, which subtracts Σ_c b_v[c]·Σ_i W[i,c]·∂L/∂b[i]:
    a reference from an ordinary backward."""
    torch.manual_seed(0)
    model = create_model("vit_cifar_tiny", num_classes=10)
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.bias.normal_()                             # a live v-bias to blend from
    x, y = torch.randn(5, 3, 32, 32), torch.randint(0, 10, (5,))
    space = ViTUnitSpace(model, (3, 32, 32))

    def loss_fn(m):
        return nn.functional.cross_entropy(m(x), y)

    scores = space.gate_gradients(model, loss_fn)
    assert all(p.grad is None for p in model.parameters())           # only the gates were differentiated
    loss_fn(model).backward()
    for g, score in zip(space.groups, scores):
        blk = model.blocks[g.block]
        if g.kind == "heads":
            proj, b_v = blk.attn.proj, blk.attn.qkv.bias.view(3, -1)[2]
            per_column = (proj.weight * proj.weight.grad).sum(0) - b_v * (proj.weight * proj.bias.grad[:, None]).sum(0)
            ref = per_column.view(g.size, -1).sum(1).abs()
        else:
            fc2 = blk.mlp.fc2.weight
            ref = (fc2 * fc2.grad).sum(0).abs()
        torch.testing.assert_close(score, ref.detach(), rtol=1e-4, atol=1e-6)


def test_shadow_weights_keep_the_pruned_values_and_revive_exactly():
    layer = nn.Linear(4, 6)
    before = layer.weight.detach().clone()
    shadow = ShadowWeights({"weight": layer.weight})
    keep = torch.tensor([1, 1, 1, 0, 0, 0], dtype=torch.bool)[:, None].expand(-1, 4)
    masks = MaskSet(layer, {"weight": keep.clone()})
    with torch.no_grad():
        layer.weight.add_(1.0)                                        # training moves the active rows
    trained = layer.weight.detach().clone()
    shadow.record(masks)
    pruned = torch.tensor([0, 1, 1, 1, 0, 0], dtype=torch.bool)[:, None].expand(-1, 4)
    masks.update("weight", pruned.clone())                            # row 0 pruned, row 3 grown at 0
    assert torch.equal(shadow.values["weight"][0], trained[0])        # its value when pruned
    assert torch.equal(shadow.values["weight"][4:], before[4:])       # never active: the initial value
    now = layer.weight.detach().clone()
    with shadow.revived(masks):
        assert torch.equal(layer.weight[0], trained[0]) and torch.equal(layer.weight[4:], before[4:])
        assert torch.equal(layer.weight[1:4], now[1:4])
    assert torch.equal(layer.weight, now)
    shadow.restore("weight", pruned & ~keep)
    assert torch.equal(layer.weight[3], before[3]) and torch.equal(layer.weight[0], torch.zeros(4))


def test_s2vite_revival_growth_revives_inactive_units(monkeypatch):
    seen = []
    after_step = UnitPruneAndGrow.after_step

    def watching(self, trainer):
        due = self._due(trainer.step)
        if due:
            weights = {n: p.detach().clone() for n, p in self.masks.params.items()}
            old = {n: m.clone() for n, m in self.masks.masks.items()}
        after_step(self, trainer)
        if due:
            seen.append((weights, old, {n: m.clone() for n, m in self.masks.masks.items()},
                         {n: v.clone() for n, v in self.shadow.values.items()},
                         {n: p.detach().clone() for n, p in self.masks.params.items()}))

    monkeypatch.setattr(UnitPruneAndGrow, "after_step", watching)
    method = create_method("s2vite", grow="revival", update_every=3)
    ctx = make_context("vit_cifar_tiny", "flops=0.6", method, budget=10)
    out = method.run(ctx)
    m = out.mechanism.metrics
    assert out.mechanism.acted and m["updates"] == len(ctx.curve.events_of("structure")) == 2 == len(seen)
    # never-active neurons (exactly zero gradient under the official criterion) are grown
    assert m["neurons_moved_total"] > 0 and m["units_changed"] > 0
    assert out.notes["faithfulness"] == "ablation: non-official growth criterion"
    assert out.structure["summary"]["mlp"] == [out.notes["mlp_per_block"]] * 4
    assert out.notes["compaction_max_abs_error"] < 1e-5
    # one extra forward and activation backward of the all-active model per update
    dense = ViTUnitSpace(ctx.model, ctx.input_size).dense_macs
    assert out.notes["revival_macs"] == 2 * 2 * ctx.train_loader.batch_size * dense
    for weights, old, new, shadow, after in seen:
        for n in old:
            pruned, grown = old[n] & ~new[n], new[n] & ~old[n]
            assert torch.equal(shadow[n][pruned], weights[n][pruned])     # the shadow: its weights when pruned
            assert torch.equal(after[n][grown], shadow[n][grown])         # grown with its shadow weights
            assert torch.equal(after[n][~new[n]], torch.zeros_like(after[n][~new[n]]))
        assert any((new[n] & ~old[n]).any() for n in old)


def test_s2vite_revival_is_s2vite_only_and_official_runs_keep_no_shadow():
    with pytest.raises(ValueError):
        create_method("svite", grow="revival")
    with pytest.raises(ValueError):
        create_method("svite-plus", base="svite", grow="revival")
    method = create_method("s2vite", grow="gradient", update_every=3)
    out = method.run(make_context("vit_cifar_tiny", "flops=0.6", method, budget=4))
    assert "faithfulness" not in out.notes and out.notes["grow"] == "gradient"


def test_s2vite_defaults_to_revival_and_says_it_is_not_the_papers_criterion():
    """The paper's gradient growth cannot revive a unit, so a plain `s2vite` runs revival and its
    record names it an ablation; svite-plus keeps its base's gradient criterion."""
    assert create_method("s2vite").config.grow == "revival"
    assert create_method("svite-plus").config.grow == "gradient"
    method = create_method("s2vite", update_every=3)
    out = method.run(make_context("vit_cifar_tiny", "flops=0.6", method, budget=4))
    assert out.notes["grow"] == "revival" and out.notes["faithfulness"] == "ablation: non-official growth criterion"


# --- mechanism telemetry and null controls ---------------------------------------------------------
def _mask_updates(monkeypatch):
    calls = []
    update = MaskSet.update

    def counting(self, name, new_mask, optimizer=None):
        calls.append(name)
        return update(self, name, new_mask, optimizer)

    monkeypatch.setattr(MaskSet, "update", counting)
    return calls


def test_svite_topology_telemetry_and_static_control():
    method = create_method("svite", update_every=3)
    ctx = make_context("vit_cifar_tiny", "sparsity=0.5", method, budget=10)
    out = method.run(ctx)
    control = create_method("svite", update_every=3, topology_updates=False)
    control_ctx = make_context("vit_cifar_tiny", "sparsity=0.5", control, budget=10)
    static = control.run(control_ctx)
    m = out.mechanism.metrics
    assert out.mechanism.acted and m["updates"] == 2 == len(ctx.curve.events_of("topology"))
    assert 0 < m["regrown_new_total"] <= m["swapped_total"] and m["mask_changed"] > 0
    assert static.mechanism.control and not static.mechanism.acted and static.masks.version == 0
    assert not control_ctx.curve.events_of("topology")
    assert any(not torch.equal(out.masks.masks[n], static.masks.masks[n]) for n in out.masks.masks)


def test_s2vite_official_growth_never_moves_a_neuron_and_says_so():
    method = create_method("s2vite", grow="gradient", update_every=3)
    ctx = make_context("vit_cifar_tiny", "flops=0.6", method, budget=10)
    out = method.run(ctx)
    mech = out.mechanism
    events = ctx.curve.events_of("structure")
    assert mech.metrics["updates"] == len(events) == 2 and mech.metrics["neurons_swapped_total"] > 0
    # an inactive neuron has exactly zero gradient: gradient growth re-selects the neurons it pruned
    assert mech.metrics["neurons_moved_total"] == 0 and "neurons growth moved nothing" in mech.reason
    assert mech.acted == (mech.metrics["heads_moved_total"] >= 1 and mech.metrics["units_changed"] >= 0.01)


def test_s2vite_null_control_keeps_its_structure_and_random_growth_moves_it(monkeypatch):
    calls = _mask_updates(monkeypatch)
    control = create_method("s2vite", grow="random", alpha=0.9, update_every=2, topology_updates=False)
    control_ctx = make_context("vit_cifar_tiny", "flops=0.6", control, budget=8)
    static = control.run(control_ctx)
    assert calls == [] and static.mechanism.control and not static.mechanism.acted
    assert not control_ctx.curve.events_of("structure") and static.mechanism.metrics["units_changed"] == 0.0
    method = create_method("s2vite", grow="random", alpha=0.9, update_every=2)
    out = method.run(make_context("vit_cifar_tiny", "flops=0.6", method, budget=8))
    assert calls and out.mechanism.acted and out.mechanism.metrics["units_moved_total"] > 0
    assert out.structure["blocks"] != static.structure["blocks"]


def test_s2vite_random_growth_grows_units_back_with_their_shadow_weights(monkeypatch):
    """Revival's signal control differs from it in the choice of units only: a unit grown at
    random gets its last weights back (at 0, a neuron has zero gradient and could never train)."""
    restored = []
    restore = ShadowWeights.restore

    def recording(self, name, entries):
        restore(self, name, entries)
        restored.append((name, int(entries.sum()), float(self.params[name].detach()[entries].abs().sum())))

    monkeypatch.setattr(ShadowWeights, "restore", recording)
    method = create_method("s2vite", grow="random", alpha=0.9, update_every=2)
    out = method.run(make_context("vit_cifar_tiny", "flops=0.6", method, budget=6))
    grown = [(n, k, w) for n, k, w in restored if k and "fc1.weight" in n]
    assert out.mechanism.metrics["neurons_moved_total"] > 0 and grown
    assert all(w > 0 for _, _, w in grown)       # non-zero weights where the units grew
    restored.clear()
    official = create_method("s2vite", grow="gradient", alpha=0.9, update_every=2)
    official.run(make_context("vit_cifar_tiny", "flops=0.6", official, budget=6))
    assert restored == []                        # the paper's criterion grows at 0, as RigL


def test_svite_plus_selector_telemetry_and_fixed_random_control():
    args = dict(token_mode="drop", token_keep=0.75, update_every=4)
    method = create_method("svite-plus", **args)
    ctx = make_context("vit_cifar_tiny", "sparsity=0.5", method, budget=12)
    out = method.run(ctx)
    m = out.mechanism.metrics
    k, n = m["token_keep"], m["tokens"]
    assert k == 13 and n == 17 and m["keep_ratio"] == round(13 / 17, 4)
    assert len(ctx.curve.values["selector_entropy"]) == 12
    assert 0 < m["entropy_last"] <= m["entropy_max"] and "entropy_drop" in m and m["base"]["updates"] == 2
    assert k - 1 <= m["distinct_tokens"] <= m["patches"]

    control = create_method("svite-plus", token_selection="fixed_random", **args)
    control_ctx = make_context("vit_cifar_tiny", "sparsity=0.5", control, budget=12)
    static = control.run(control_ctx)
    selector = selector_of(static.model)
    fixed = selector.fixed.tolist()
    assert static.mechanism.control and not static.mechanism.acted
    assert static.mechanism.metrics["distinct_extra"] == 0 and "selector_entropy" not in control_ctx.curve.values
    assert static.structure["token_selector"]["fixed"] == fixed and len(fixed) == k - 1
    x = torch.randn(5, 3, 16, 16)
    seen = []
    handle = selector.register_forward_hook(lambda mod, inp, outp: seen.append((inp[0], outp)))
    static.model.eval()(x)
    handle.remove()
    tokens_in, tokens_out = seen[0]
    assert torch.equal(tokens_out[:, 1:], tokens_in[:, 1:][:, fixed])   # the same positions for every image


def test_selector_entropy_summary_is_bounded_and_matches_every_step():
    """The selector's entropy, kept in every mid-fit checkpoint: a bounded summary, not a value per step
    (~1.5 M steps on ImageNet), with the telemetry a per-step list gave."""
    from types import SimpleNamespace

    from sparsebench.methods.svite import SelectorTelemetry
    from sparsebench.training.telemetry import TrainingCurve

    values = [1.0 + (s % 13) / 8 for s in range(200_000)]       # exact in float32, as the selector gives
    selector = SimpleNamespace(last_entropy=None)
    watch = SelectorTelemetry(selector, total=len(values))
    trainer = SimpleNamespace(curve=TrainingCurve(), position=0)
    for step, v in enumerate(values):
        selector.last_entropy, trainer.position = torch.tensor(v), step + 1
        watch.after_step(trainer)
    assert len(str(watch.state_dict())) < 1000                           # not 200,000 values
    assert len(trainer.curve.values["selector_entropy"]) == 100
    window = 10
    assert watch.summary() == pytest.approx({"first": sum(values[:window]) / window,
                                             "last": sum(values[-window:]) / window,
                                             "mean": sum(values) / len(values)}, rel=1e-12)
    short = SelectorTelemetry(selector=None, total=7)
    short.load_state_dict({"entropies": [3.0, 1.0, 2.0, 5.0, 4.0, 6.0, 0.5]})   # a checkpoint saved per step
    assert short.summary() == pytest.approx({"first": 2.0, "last": 3.5, "mean": 21.5 / 7})
    assert short.state_dict()["count"] == 7


def test_an_update_interval_past_t_end_is_one_update_said_and_recorded(tmp_path, caplog):
    """update_every 100000 on a 19-step budget: one update, at the last step before T_end; the run says so
    in one warning line and its record states the interval used beside the one given."""
    import logging

    from sparsebench.runners.pipeline import RunOptions, execute
    from sparsebench.specs import MeasureSpec
    from conftest import tiny_spec

    spec = tiny_spec("svite", model="vit_cifar_tiny", method_args=(("update_every", 100000),),
                     measure=MeasureSpec(latency=False))
    with caplog.at_level(logging.WARNING, logger="sparsebench"):
        record = execute(spec, RunOptions(out=tmp_path))
    t_end = math.ceil(0.8 * record.cost.method_budget_steps)
    said = f"update_every 100000 >= T_end {t_end} (t_end 0.8 of {record.cost.method_budget_steps} steps): " \
           f"one update, at step {t_end - 1}"
    assert [r.getMessage() for r in caplog.records if "update_every" in r.getMessage()] == [f"sparsebench: warning: {said}"]
    assert record.notes["update_every"] == t_end - 1
    assert record.notes["adjusted"] == [{"setting": "update_every", "given": 100000, "used": t_end - 1, "why": said}]
    assert [u["step"] for u in record.notes["updates"]] == [t_end - 1]
    assert record.selection["eval_every"] == record.data["steps_per_epoch"]     # evals_per_epoch 1


@pytest.mark.parametrize("selection", ["learned", "frozen_scorer"])
def test_svite_plus_frozen_scorer_signal_control_keeps_the_scorer_at_its_init(monkeypatch, selection):
    """`token_selection="frozen_scorer"`: the selector still picks per image through its scorer, but
    no step moves the scorer (the learned selector's does move); the run is marked as the signal control."""
    from sparsebench.methods import svite

    inserted = {}
    insert = svite.insert_selector

    def spy(model, selector):
        inserted["init"] = copy.deepcopy(selector.scorer.state_dict())
        insert(model, selector)

    monkeypatch.setattr(svite, "insert_selector", spy)
    method = create_method("svite-plus", token_mode="drop", token_keep=0.75, update_every=4, token_selection=selection)
    out = method.run(make_context("vit_cifar_tiny", "sparsity=0.5", method, budget=6))
    final = selector_of(out.model).scorer.state_dict()
    unchanged = all(torch.equal(final[k].cpu(), v.cpu()) for k, v in inserted["init"].items())
    assert unchanged == (selection == "frozen_scorer")
    assert out.mechanism.signal_control == (None if selection == "learned" else "frozen scorer")
    assert not out.mechanism.control and selector_of(out.model).fixed is None
    # the frozen scorer's selection sends no gradient back into the embeddings either
    selector = selector_of(out.model).train()
    x = torch.randn(2, 5, selector.scorer.in_features, requires_grad=True)
    scores = selector.soft_scores(x)
    assert scores.requires_grad == (selection == "learned")     # frozen: nothing upstream can learn from it


def test_s2vite_and_rigl_declare_random_growth_as_their_signal_control():
    from sparsebench.methods.base import signal_control_runs

    assert create_method("s2vite", grow="random").signal_control == "random growth"
    assert create_method("s2vite").signal_control is None
    assert create_method("rigl", grow="random").signal_control == "random growth"     # SET under RigL's name
    assert create_method("rigl").signal_control is None
    assert signal_control_runs("s2vite", {"grow": "revival", "alpha": 0.5}) == [
        ("random growth", "s2vite", {"grow": "random", "alpha": 0.5})]
    # random growth restores the units' last weights, as revival does: the paper's criterion, which
    # grows at 0, has no matched control
    assert signal_control_runs("s2vite", {"grow": "gradient", "alpha": 0.5}) == []
    # RigL's random-growth control is SET with RigL's schedule, another method; rigl[grow=random] is the same run
    assert signal_control_runs("rigl", {"grow": "gradient"}) == [("random growth", "set", {"grow": "random"})]


def test_s2vite_revival_grows_the_units_its_scores_rank_first_and_random_does_not(monkeypatch):
    """The same seed, revival against its random control: both prune the same units and grow as
    many at the first update; revival's grown neurons score higher on revival's own scores than the
    random control's, which score as the candidates do on average."""
    from sparsebench.methods import svite
    from sparsebench.training.masks import topk_mask

    original = svite.drop_and_grow

    def first_update(grow):
        calls = []

        def recording(mask, weight, grow_scores, k, generator=None):
            new = original(mask, weight, grow_scores, k, generator)
            kept = topk_mask(torch.where(mask, weight.detach().abs().double(), -1.0),
                             int(mask.sum()) - min(k, int(mask.sum()), mask.numel() - int(mask.sum()))) & mask
            calls.append({"kept": kept, "grown": new & ~kept, "scores": grow_scores.clone(), "k": k})
            return new

        monkeypatch.setattr(svite, "drop_and_grow", recording)
        method = create_method("s2vite", grow=grow, update_every=10, alpha=0.5)
        method.run(make_context("vit_cifar_tiny", "flops=0.6", method, budget=12))
        monkeypatch.setattr(svite, "drop_and_grow", original)
        return calls[1::2]                                    # the neuron calls of the one update, per block

    revival, random = first_update("revival"), first_update("random")
    assert [c["k"] for c in revival] == [c["k"] for c in random]
    assert all(torch.equal(a["kept"], b["kept"]) for a, b in zip(revival, random))
    scores = [c["scores"] for c in revival]                   # revival's scores, the same state in both runs
    chosen = torch.cat([s[c["grown"]] for s, c in zip(scores, revival)]).mean()
    drawn = torch.cat([s[c["grown"]] for s, c in zip(scores, random)]).mean()
    candidates = torch.cat([s[~c["kept"]] for s, c in zip(scores, revival)]).mean()
    assert chosen > 1.5 * drawn and chosen > 1.5 * candidates

import copy
import dataclasses

import pytest
import torch

from sparsebench.errors import SpecError
from sparsebench.methods import create_method
from sparsebench.methods import gap
from sparsebench.training.masks import prunable_weights
from sparsebench.training.trainer import HookOrder, TrainerHook

from conftest import make_context

S = 0.9


def _context(name, model="resnet20_tiny", budget=24, seed=0, recipe=None, **args):
    if name.startswith("gap"):
        args.setdefault("rounds", 2)          # two rounds of tiny phases; the default R is tested on its own
    method = create_method(name, **args)
    ctx = make_context(model, f"sparsity={S}", method, seed=seed, budget=budget)
    if recipe:
        ctx.recipe = dataclasses.replace(ctx.recipe, **recipe)
    return method, ctx


class MaskChecker(TrainerHook):
    """Runs after MaskSet: masked entries are 0 (weights and optimizer state) after every step;
    at a grow, newly unmasked entries are 0 and so is their optimizer state."""

    order = HookOrder.MASKS + 1

    def __init__(self, masks):
        self.masks, self.steps, self.grows = masks, 0, 0
        self.previous = {n: m.clone() for n, m in masks.masks.items()}

    def after_step(self, trainer):
        self.steps += 1
        for n, p in self.masks.params.items():
            off = ~self.masks.masks[n]
            assert torch.all(p[off] == 0)
            for value in trainer.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert torch.all(value[off] == 0)
        self.previous = {n: m.clone() for n, m in self.masks.masks.items()}

    def on_phase(self, trainer, phase):
        for n, p in self.masks.params.items():
            regrown = self.masks.masks[n] & ~self.previous[n]
            if regrown.any():
                self.grows += 1
            assert torch.all(p[regrown] == 0)
            for value in trainer.optimizer.state.get(p, {}).values():
                if torch.is_tensor(value) and value.shape == p.shape:
                    assert torch.all(value[regrown] == 0)


def _with_checker(ctx):
    checkers = []
    make_trainer = ctx.make_trainer

    def wrapped(model=None, hooks=(), **kw):
        masks = next(h for h in hooks if hasattr(h, "masks"))
        checkers.append(MaskChecker(masks))
        return make_trainer(model, hooks=[*hooks, checkers[-1]], **kw)

    ctx.make_trainer = wrapped
    return checkers


@pytest.mark.parametrize("name", ["gap-cyclic", "gap-parallel"])
def test_prune_back_is_exact_and_final_sparsity_is_the_target(monkeypatch, name):
    method, ctx = _context(name)
    calls = []
    original = gap.prune_back

    def spy(masks, partition, keep, *args, **kw):
        original(masks, partition, keep, *args, **kw)
        for n in partition.names:
            p = masks.params[n]
            assert int((p == 0).sum()) == round(S * p.numel()) == p.numel() - keep[n]
        calls.append(partition.names)

    monkeypatch.setattr(gap, "prune_back", spy)
    outcome = method.run(ctx)
    assert len(calls) == (6 if name == "gap-cyclic" else 2 * 3)
    params = prunable_weights(outcome.model, skip_first=True, skip_last=True)
    assert list(params) == outcome.prunable
    for n, p in params.items():
        assert int((p == 0).sum()) == round(S * p.numel())
        assert float((p == 0).float().mean()) == pytest.approx(S, abs=max(1e-3, 0.5 / p.numel()))
    assert outcome.masks.sparsity() == pytest.approx(S, abs=1e-3)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["gap-cyclic", "gap-parallel"])
def test_masks_hold_with_momentum_and_weight_decay_and_grown_entries_start_at_zero(name, precision):
    method, ctx = _context(name, recipe={"weight_decay": 0.05, "precision": precision})
    checkers = _with_checker(ctx)
    method.run(ctx)
    assert sum(c.steps for c in checkers) == ctx.budget.used == 24
    assert all(c.grows > 0 for c in checkers)


def test_regrown_entries_have_zero_optimizer_state_with_momentum_carried_over(monkeypatch):
    method, ctx = _context("gap-cyclic", restart_optimizer=False)
    seen = []
    original = gap.grow

    def spy(masks, partition, optimizer):
        before = {n: masks.masks[n].clone() for n in partition.names}
        original(masks, partition, optimizer)
        for n in partition.names:
            regrown = masks.masks[n] & ~before[n]
            p = masks.params[n]
            assert torch.all(p[regrown] == 0)
            if optimizer is not None and p in optimizer.state:
                assert torch.all(optimizer.state[p]["momentum_buffer"][regrown] == 0)
                seen.append(n)

    monkeypatch.setattr(gap, "grow", spy)
    method.run(ctx)
    assert seen                                            # phases after the first carry momentum


def test_pgap_merge_takes_partitions_from_their_replica_and_averages_the_rest(monkeypatch):
    method, ctx = _context("gap-parallel")
    merges = []
    original = gap.merge_replicas

    def spy(model, replicas, partitions, shared="average"):
        original(model, replicas, partitions, shared)
        merged = model.state_dict()
        states = [r.state_dict() for r in replicas]
        owned = 0
        for key, value in merged.items():
            owner = [k for k, p in enumerate(partitions) if p.owns(key)]
            if owner:
                owned += 1
                assert torch.equal(value, states[owner[0]][key])            # bit for bit
            elif value.is_floating_point():
                assert torch.equal(value, torch.stack([s[key] for s in states]).mean(0))
        assert any("running_mean" in k and any(p.owns(k) for p in partitions) for k in merged)
        merges.append(owned)

    monkeypatch.setattr(gap, "merge_replicas", spy)
    outcome = method.run(ctx)
    assert len(merges) == 2
    assert outcome.notes["replica_steps"] == 24 and ctx.budget.used == 24


@pytest.mark.parametrize("shared", ["average", "replica0", "fresh"])
def test_merge_shared_modes(cpu_model_factory, shared):
    model = cpu_model_factory("resnet20_tiny")
    params = prunable_weights(model, True, True)
    partitions = gap.make_partitions(params, 3, "by_stage")
    replicas = []
    for k in range(3):
        r = copy.deepcopy(model)
        with torch.no_grad():
            for p in r.parameters():
                p.add_(k + 1.0)
        replicas.append(r)
    before = copy.deepcopy(model.state_dict())
    gap.merge_replicas(model, replicas, partitions, shared)
    fc = model.fc.weight
    expected = {"average": before["fc.weight"] + 2.0, "replica0": before["fc.weight"] + 1.0,
                "fresh": before["fc.weight"]}[shared]
    assert torch.allclose(fc, expected)
    assert torch.equal(model.layer2[0].bn1.weight, replicas[1].layer2[0].bn1.weight)


def test_partitions_by_stage_balanced_and_vit_blocks(cpu_model_factory):
    cnn = prunable_weights(cpu_model_factory("resnet56_tiny"), True, True)
    stages = gap.make_partitions(cnn, 3, "by_stage")
    assert [p.blocks for p in stages] == [("layer1.0", "layer1.1"), ("layer2.0", "layer2.1"), ("layer3.0", "layer3.1")]
    balanced = gap.make_partitions(cnn, 2, "balanced_params")
    assert sum(p.size for p in balanced) == sum(p.numel() for p in cnn.values())
    assert all(len(p.blocks) >= 1 for p in balanced)
    # with the stem and classifier prunable they join the first and last partitions
    full = gap.make_partitions(prunable_weights(cpu_model_factory("resnet20_tiny")), 3, "by_stage")
    assert "conv1.weight" in full[0].names and "fc.weight" in full[-1].names
    vit = prunable_weights(cpu_model_factory("vit_cifar_tiny"), True, True)
    groups = gap.make_partitions(vit, 2, "by_stage")
    assert [p.blocks for p in groups] == [("blocks.0", "blocks.1"), ("blocks.2", "blocks.3")]
    assert not any(n.startswith(("patch_embed", "head")) for p in groups for n in p.names)


@pytest.mark.parametrize("args,budget,message", [
    ({"num_groups": 5, "partition": "balanced_params"}, 24, "exceeds the 3 prunable blocks"),
    ({"num_groups": 4}, 24, "by_stage"),
    ({"num_groups": 30, "partition": "random"}, 90, "exceeds the"),
    ({"rounds": 2}, 5, "too small for rounds·num_groups = 6 phases"),
])
def test_bad_configurations_are_one_line_spec_errors(args, budget, message):
    method, ctx = _context("gap-cyclic", budget=budget, **args)
    with pytest.raises(SpecError, match=message) as info:
        method.run(ctx)
    assert "\n" not in str(info.value)


def test_config_validation():
    with pytest.raises(SpecError, match="num_groups"):
        create_method("gap-cyclic", num_groups=0)
    with pytest.raises(SpecError, match="random"):
        method, ctx = _context("gap-parallel", partition="random")
        method.run(ctx)


@pytest.mark.parametrize("name", ["gap-cyclic", "gap-parallel"])
def test_budget_and_phase_log(name):
    method, ctx = _context(name, budget=25, rounds=2)
    outcome = method.run(ctx)
    notes = outcome.notes
    assert ctx.budget.used == 24 <= ctx.budget.limit and notes["steps_unused"] == 1
    assert notes["phase_steps"] == 4 and len(notes["phases"]) == 6
    total = sum(p.numel() for p in prunable_weights(outcome.model, True, True).values())
    for phase in notes["phases"]:
        expected = (phase["grown_size"] + (1 - S) * (total - phase["grown_size"])) / total
        assert phase["dense_fraction"] == pytest.approx(expected)
    if name == "gap-parallel":
        assert notes["replica_steps"] == 24 and "replicas" in notes["compute"]


@pytest.mark.parametrize("name", ["gap-cyclic", "gap-parallel"])
def test_deterministic_under_a_seed(name):
    def run():
        method, ctx = _context(name, budget=12)
        return method.run(ctx)

    a, b = run(), run()
    assert all(torch.equal(a.masks.masks[n], b.masks.masks[n]) for n in a.masks.masks)
    sa, sb = a.model.state_dict(), b.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("args", [{"partition": "random"}, {"partition": "balanced_params", "num_groups": 2},
                                  {"distribution": "erk", "prune_scope": "global"},
                                  {"distribution": "global", "init_mask": "magnitude_init"},
                                  {"restart_optimizer": True, "lr_restart": True}, {"faithful_masking": True}])
def test_ablation_switches_reach_the_global_target(args):
    method, ctx = _context("gap-cyclic", **args)
    outcome = method.run(ctx)
    assert outcome.masks.sparsity() == pytest.approx(S, abs=1e-3)
    params = outcome.masks.params
    nnz = sum(int((p != 0).sum()) for p in params.values())
    assert nnz <= sum(outcome.masks.nnz().values())


def test_two_four_pattern_prune_back():
    method, ctx = _context("gap-cyclic", pattern="2:4")
    outcome = method.run(ctx)
    assert outcome.pattern == "2:4"                      # declared: the only way to the 2:4 kernels
    for n, p in outcome.masks.params.items():
        groups = (p.detach().reshape(p.shape[0], -1) == 0).reshape(p.shape[0], -1, 4).sum(-1)
        assert bool((groups >= 2).all()), n


def test_gap_on_a_vit_keeps_patch_embed_and_head_dense():
    method, ctx = _context("gap-parallel", model="vit_cifar_tiny", num_groups=2)
    outcome = method.run(ctx)
    assert not any(n.startswith(("patch_embed", "head")) for n in outcome.masks.masks)
    assert outcome.masks.sparsity() == pytest.approx(S, abs=1e-3)
    assert outcome.notes["partitions"] == [["blocks.0", "blocks.1"], ["blocks.2", "blocks.3"]]


@pytest.mark.parametrize("name,model", [("gap-cyclic", "resnet20_tiny"), ("gap-parallel", "resnet20_tiny"),
                                        ("gap-cyclic", "vit_cifar_tiny")])
def test_gap_runs_end_to_end_through_the_pipeline(tmp_path, name, model):
    from sparsebench.runners.pipeline import RunOptions, execute
    from conftest import tiny_spec

    record = execute(tiny_spec(name, model=model, target=f"sparsity={S}"), RunOptions(out=tmp_path))
    assert record.achieved_sparsity == pytest.approx(S, abs=1e-3)
    assert record.cost.method_steps <= record.cost.method_budget_steps
    assert record.notes["phases"] and record.realization.kind == "auto"
    assert record.sparsity_pattern is None


def test_a_two_four_gap_run_records_its_pattern_and_takes_the_two_four_path(tmp_path):
    """The record names the declared pattern; on a CPU the 2:4 path ends at the missing kernel."""
    from sparsebench.runners.pipeline import RunOptions, execute
    from conftest import tiny_spec

    spec = tiny_spec("gap-cyclic", model="vit_cifar_tiny", target="sparsity=0.5", method_args=(("pattern", "2:4"),))
    record = execute(spec, RunOptions(out=tmp_path))
    assert record.sparsity_pattern == "2:4"
    assert not record.realization.realizable and "Linear weights are 2:4" in record.realization.reason
    assert "semi-structured kernel" in record.realization.reason


@pytest.mark.parametrize("name", ["gap-cyclic", "gap-parallel"])
def test_prune_back_change_is_measured_and_the_null_control_keeps_its_masks(name):
    method, ctx = _context(name, budget=24, rounds=2)
    outcome = method.run(ctx)
    control_method, control_ctx = _context(name, budget=24, rounds=2, regrow=False)
    control = control_method.run(control_ctx)
    m, c = outcome.mechanism, control.mechanism
    phases = method.config.rounds * method.config.num_groups
    assert m.acted and m.metrics["prune_backs"] == m.metrics["phases"] == phases == len(m.metrics["changed"])
    assert m.metrics["mean_changed"] == pytest.approx(sum(m.metrics["changed"]) / phases, abs=1e-4)
    events = ctx.curve.events_of("prune_back")
    assert [e["changed"] for e in events] == m.metrics["changed"] and len(ctx.curve.events_of("grow")) == phases
    assert c.control and not c.acted and c.metrics["prune_backs"] == 0
    assert control.masks.version == 0 and not control_ctx.curve.events_of("prune_back")
    assert control_ctx.budget.used == ctx.budget.used
    assert outcome.masks.nnz() == control.masks.nnz()
    assert any(not torch.equal(outcome.masks.masks[n], control.masks.masks[n]) for n in outcome.masks.masks)


def test_the_null_control_follows_the_methods_learning_rate_restarts():
    """With lr_restart, method and control both start a new warm-up + cosine every phase: their
    learning rates agree step by step, and rise again at every phase boundary."""
    method, ctx = _context("gap-cyclic", budget=24, lr_restart=True)
    method.run(ctx)
    control_method, control_ctx = _context("gap-cyclic", budget=24, lr_restart=True, regrow=False)
    control_method.run(control_ctx)
    assert control_ctx.curve.lr == pytest.approx(ctx.curve.lr)
    lr, phases = ctx.curve.lr, len(ctx.curve.events_of("grow"))
    rises = sum(1 for a, b in zip(lr, lr[1:]) if b > a * 1.5)
    assert rises >= phases - 1


@pytest.mark.parametrize("name", ["gap-cyclic", "gap-parallel"])
def test_records_state_sequential_depth_and_total_steps(name):
    method, ctx = _context(name, budget=24, rounds=2)
    notes = method.run(ctx).notes
    cfg = method.config
    assert notes["total_steps"] == ctx.budget.used == cfg.rounds * cfg.num_groups * notes["phase_steps"]
    depth = cfg.rounds * notes["phase_steps"] if name == "gap-parallel" else notes["total_steps"]
    assert notes["sequential_steps"] == depth


def test_gap_and_rigl_at_erk_keep_the_same_per_layer_densities():
    """At one distribution GaP and RigL prune the same set (input layer and classifier dense) to the
    same per-layer densities, so their comparison is about regrowth, not about where the weights sit."""
    densities = {}
    for name, args in (("gap-cyclic", {"distribution": "erk"}), ("rigl", {}), ("gmp", {"distribution": "erk"})):
        method, ctx = _context(name, budget=24, **args)
        masks = method.run(ctx).masks.masks
        densities[name] = {n: round(float(m.float().mean()), 4) for n, m in masks.items()}
    assert densities["gap-cyclic"] == densities["rigl"] == densities["gmp"]
    assert len(set(densities["rigl"].values())) > 2                # ERK: not one uniform density


def test_default_rounds_follow_the_official_ten_down_to_twenty_steps_per_phase():
    assert gap.default_rounds(10_000, 3) == 10                       # official R where the budget allows
    assert gap.default_rounds(285, 3) == 4 and gap.default_rounds(570, 3) == 9
    assert gap.default_rounds(30, 3) == 1                            # never below one round
    method, ctx = _context("gap-cyclic", budget=130, rounds=None)
    notes = method.run(ctx).notes
    assert notes["rounds"] == 2 and notes["phase_steps"] == 21 >= gap.MIN_PHASE_STEPS
    cfg = method.config
    assert cfg.lr_restart and cfg.restart_optimizer                    # the official per-phase restarts


def test_five_rounds_with_restarts_restart_the_learning_rate_every_phase():
    method, ctx = _context("gap-cyclic", budget=90, rounds=5, lr_restart=True, restart_optimizer=True)
    method.run(ctx)
    phases = 5 * method.config.num_groups
    steps_per_phase = 90 // phases
    lr = ctx.curve.lr
    starts = [lr[i * steps_per_phase] for i in range(1, phases)]
    ends = [lr[i * steps_per_phase - 1] for i in range(1, phases)]
    assert len(lr) == phases * steps_per_phase
    assert all(start > end for start, end in zip(starts, ends))     # a new warm-up + cosine each phase
    assert len({round(x, 12) for x in starts}) == 1                 # the same schedule every phase


def test_an_outcome_declares_only_well_formed_patterns_on_masks():
    from torch import nn

    from sparsebench.methods import Outcome

    assert Outcome(nn.Linear(4, 4), "masked", pattern="2:4").pattern == "2:4"
    for bad in ("2-4", "4:2", "0:4"):
        with pytest.raises(ValueError, match="N:M"):
            Outcome(nn.Linear(4, 4), "masked", pattern=bad)
    with pytest.raises(ValueError, match="describes masks"):
        Outcome(nn.Linear(4, 4), "compacted", pattern="2:4")


def test_random_prune_back_keeps_the_counts_but_not_the_largest_weights():
    """The signal control's prune-back: the same per-layer count, picked by random scores, not |w|."""
    from torch import nn

    from sparsebench.training.masks import MaskSet

    layer = nn.Linear(8, 8, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.arange(64, dtype=torch.float32).view(8, 8) + 1)   # |w| ranks are known
    part = gap.Partition(("",), ("weight",), 64)
    kept = {}
    for criterion in ("magnitude", "random"):
        masks = MaskSet(layer, {"weight": torch.ones(8, 8, dtype=torch.bool)})
        gap.prune_back(masks, part, {"weight": 16}, generator=torch.Generator().manual_seed(0), criterion=criterion)
        kept[criterion] = masks.masks["weight"].clone()
    assert kept["magnitude"].flatten().nonzero().flatten().tolist() == list(range(48, 64))   # the 16 largest
    assert int(kept["random"].sum()) == 16
    assert (kept["random"] & kept["magnitude"]).sum() < 16          # not the magnitude choice


@pytest.mark.parametrize("name", ["gap-cyclic", "gap-parallel"])
def test_the_random_prune_back_signal_control_runs_and_is_marked(name):
    from sparsebench.methods.base import config_dict

    method, ctx = _context(name, budget=24, rounds=2, prune_scores="random")
    outcome = method.run(ctx)
    m = outcome.mechanism
    assert method.signal_control == "random prune-back" and m.signal_control == "random prune-back"
    assert m.label == "signal control" and not m.control and "signal control" in m.reason
    real, real_ctx = _context(name, budget=24, rounds=2)
    magnitude = real.run(real_ctx)
    assert real.signal_control is None and magnitude.mechanism.signal_control is None
    assert outcome.masks.nnz() == magnitude.masks.nnz()              # the same per-layer counts
    assert any(not torch.equal(outcome.masks.masks[n], magnitude.masks.masks[n]) for n in outcome.masks.masks)
    assert "prune_scores" not in config_dict(real.config)           # the default leaves spec hashes as they were
    assert config_dict(method.config)["prune_scores"] == "random"

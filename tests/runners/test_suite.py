import pytest

from sparsebench.errors import SpecError
from sparsebench.runners.pipeline import resolve
from sparsebench.runners.suite import expand, load_suite


def test_quick_suite_expands_with_family_recipes():
    suite = load_suite("benchmarks/quick.yaml")
    # 34 + rigl, set, gap-cyclic × 2 sparsities and gap-parallel at 0.9 on the CNN + pass (CNN only) and ofb
    # (ViT only) × 2 flops
    # + svite × 2 targets, s2vite (its default, grow=revival) × 2 and svite-plus at one, on the ViT
    assert len(suite.specs) == 50
    assert suite.skipped == []      # PASS and OFB name the one model each supports (`--smoke` fails on a skipped pair)
    vit = [s for s in suite.specs if s.model == "vit_cifar_tiny"]
    cnn = [s for s in suite.specs if s.model == "resnet20_tiny"]
    assert {s.recipe.optimizer for s in vit} == {"adamw"} and {s.recipe.pretrain_epochs for s in vit} == {30}
    assert {s.recipe.optimizer for s in cnn} == {"sgd"} and {s.recipe.pretrain_epochs for s in cnn} == {15}
    assert sum(s.method == "dense" for s in suite.specs) == 2
    assert len({s.run_id for s in suite.specs}) == 50
    s2vite = sorted((dict(resolve(s).method_args)["grow"], s.target.value) for s in suite.specs if s.method == "s2vite")
    assert s2vite == [("revival", 0.25), ("revival", 0.5)]
    assert {(s.model, s.target.value) for s in suite.specs if s.method == "gap-parallel"} == {("resnet20_tiny", 0.9)}


def test_a_method_entry_narrows_models_and_targets():
    raw = {"methods": ["random", {"name": "gmp", "models": ["resnet20_tiny"], "targets": {"sparsity": [0.8]}}],
           "models": ["resnet20_tiny", "vit_cifar_tiny"], "datasets": ["digits"], "targets": {"sparsity": [0.5, 0.9]}}
    suite = expand(raw)
    assert sorted((s.method, s.model, s.target.value) for s in suite.specs) == [
        ("gmp", "resnet20_tiny", 0.8), ("random", "resnet20_tiny", 0.5), ("random", "resnet20_tiny", 0.9),
        ("random", "vit_cifar_tiny", 0.5), ("random", "vit_cifar_tiny", 0.9)]
    raw["methods"][1]["models"] = ["resnet56_tiny"]
    with pytest.raises(SpecError, match="'resnet56_tiny', which is not in the suite's models"):
        expand(raw)
    raw["methods"][1] = {"name": "gmp", "targets": [0.8]}
    with pytest.raises(SpecError, match="targets must map"):
        expand(raw)


@pytest.mark.parametrize("path", ["benchmarks/cifar.yaml", "benchmarks/transfer.yaml"])
def test_research_suites_validate(path):
    suite = load_suite(path)
    assert len(suite.specs) > 500
    assert {s.seed for s in suite.specs} == {0, 1, 2}
    sparsity = sorted({s.target.value for s in suite.specs if s.target.kind == "sparsity"})
    assert len(sparsity) >= 5        # trade-off curves, not points


def test_method_args_reach_the_spec():
    suite = expand({"methods": [{"name": "random", "args": {"distribution": "erk"}}], "models": ["resnet20_tiny"],
                    "datasets": ["digits"], "targets": {"sparsity": [0.5]}})
    assert dict(suite.specs[0].method_args) == {"distribution": "erk"}


def test_bad_method_args_in_a_suite_are_rejected():
    with pytest.raises(SpecError, match="unknown argument 'nope'"):
        expand({"methods": [{"name": "random", "args": {"nope": 1}}], "models": ["resnet20_tiny"],
                "datasets": ["digits"], "targets": {"sparsity": [0.5]}})


def test_controls_add_each_seed_methods_null_control_and_entries_take_their_own_recipe(monkeypatch):
    from sparsebench.methods import METHODS

    monkeypatch.setattr(METHODS.get("rigl").factory, "null_control", {"grow": "random"})   # any valid Config value
    raw = {"methods": ["random", {"name": "rigl", "recipe": {"pretrain_epochs": 2}}],
           "models": ["resnet20_tiny"], "datasets": ["digits"], "targets": {"sparsity": [0.5]}, "seeds": [0, 1],
           "recipe": {"pretrain_epochs": 5}}
    assert sorted(s.method for s in expand(raw).specs) == ["random", "random", "rigl", "rigl"]
    suite = expand({**raw, "controls": True})
    rigl = sorted((dict(s.method_args).get("grow", "default"), s.seed, s.recipe.pretrain_epochs)
                  for s in suite.specs if s.method == "rigl")
    assert rigl == [("default", 0, 2), ("default", 1, 2), ("random", 0, 2), ("random", 1, 2)]
    assert {s.recipe.pretrain_epochs for s in suite.specs if s.method == "random"} == {5}
    assert len({s.run_id for s in suite.specs}) == len(suite.specs) == 6
    with pytest.raises(SpecError, match="'controls' must be true or false"):
        expand({**raw, "controls": "yes"})
    with pytest.raises(SpecError, match="recipe: unknown key 'epochs'"):
        expand({**raw, "methods": [{"name": "rigl", "recipe": {"epochs": 2}}]})


def test_pass_suites_give_the_search_its_budget_and_pair_it_with_its_control():
    quick = [s for s in load_suite("benchmarks/quick.yaml").specs if s.method == "pass"]
    assert quick and {s.recipe.search_epochs for s in quick} == {2}
    evidence = load_suite("benchmarks/evidence/pass.yaml").specs
    args = lambda s: dict(s.method_args)
    passes = [s for s in evidence if s.method == "pass"]
    from sparsebench.methods import create_method

    signal = lambda s: create_method("pass", **args(s)).signal_control                   # noqa: E731
    controls = [s for s in passes if not args(s).get("search", True)]
    searched = [s for s in passes if args(s).get("search", True) and signal(s) is None]
    assert {s.recipe.search_epochs for s in passes} == {2} and len(controls) == len(searched) > 0
    main = [s for s in searched if (args(s)["scope"], args(s).get("use_prompt", True)) == ("global", True)]
    by_control = {name: [s for s in passes if signal(s) == name] for name in create_method("pass").signal_controls}
    assert {name: len(runs) for name, runs in by_control.items()} == dict.fromkeys(by_control, len(main)) \
        and len(main) == 10                                     # 5 seeds × 2 targets, the method rows' settings
    assert ("global", "coupled") in {(args(s)["scope"], args(s)["residual_mode"]) for s in searched}
    l1 = {(args(s)["scope"], args(s)["residual_mode"]) for s in evidence if s.method == "l1-channel"}
    assert l1 == {("global", "coupled"), ("uniform", "coupled")}
    assert {s.seed for s in evidence} == {0, 1, 2, 3, 4} and {s.target.value for s in evidence} == {0.5, 0.3}


def test_a_signal_control_entry_gets_no_null_control_of_its_own():
    """`controls: true` pairs C-GaP with its null control; its listed signal control (random
    prune-back) is a control already and gets none."""
    raw = {"methods": ["gap-cyclic", {"name": "gap-cyclic", "args": {"prune_scores": "random"}}],
           "models": ["resnet20_tiny"], "datasets": ["digits"], "targets": {"sparsity": [0.5]}, "seeds": [0],
           "controls": True}
    settings = sorted(tuple(sorted((k, v) for k, v in dict(s.method_args).items() if k in ("regrow", "prune_scores")))
                      for s in expand(raw).specs)
    assert settings == [(), (("prune_scores", "random"),), (("regrow", False),)]

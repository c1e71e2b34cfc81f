import pytest

from sparsebench.errors import SpecError
from sparsebench.runners.suite import expand, load_suite


def test_quick_suite_expands_with_family_recipes():
    suite = load_suite("benchmarks/quick.yaml")
    assert len(suite.specs) == 40
    # ViT-only methods (SViTE family) are skipped on the CNN, each listed
    assert sorted(m for m, model, _ in suite.skipped) == ["s2vite", "svite", "svite-plus"]
    assert {model for _, model, _ in suite.skipped} == {"resnet20_tiny"}
    vit = [s for s in suite.specs if s.model == "vit_cifar_tiny"]
    cnn = [s for s in suite.specs if s.model == "resnet20_tiny"]
    assert {s.recipe.optimizer for s in vit} == {"adamw"} and {s.recipe.pretrain_epochs for s in vit} == {30}
    assert {s.recipe.optimizer for s in cnn} == {"sgd"} and {s.recipe.pretrain_epochs for s in cnn} == {15}
    assert sum(s.method == "dense" for s in suite.specs) == 2
    assert len({s.run_id for s in suite.specs}) == 40


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

"""Each seed method's default budget: a plain `sparsebench run` (no --recipe) gives the method the
budget at which its mechanism acts on digits, on every model kind it supports, and says so in its
printed line; suites that state no budget give it the same one, and one that does still wins."""
import json
from pathlib import Path

import pytest

from sparsebench.cli import main
from sparsebench.methods import METHODS, create_method
from sparsebench.models import create_model
from sparsebench.runners.pipeline import resolve
from sparsebench.runners.suite import expand, load_suite

REPO = Path(__file__).resolve().parents[2]
# S²ViTE's default growth is revival: the paper's gradient criterion moves no unit at any budget
# (an inactive neuron's grow score is exactly 0; its class docstring)
SEED_METHODS = ("pass", "gap-cyclic", "gap-parallel", "svite", "s2vite", "svite-plus", "ofb")
MODELS = {"resnet20_tiny": "cnn", "vit_cifar_tiny": "vit"}


def _pairs():
    for name in SEED_METHODS:
        method = create_method(name)
        for model, family in MODELS.items():
            if method.supports(create_model(model, num_classes=10, img_size=16), family):
                yield name, model, "sparsity=0.5" if method.target_kind == "sparsity" else "flops=0.5"


PAIRS = list(_pairs())


def test_every_seed_method_runs_on_a_model_kind_and_declared_budgets_name_recipe_values():
    assert {name for name, _, _ in PAIRS} == set(SEED_METHODS)
    assert METHODS.get("ofb").factory.default_budget == {"search_epochs": 5}
    assert METHODS.get("pass").factory.default_budget == {"search_epochs": 2}


def test_a_suite_that_states_no_budget_gives_the_methods_theirs_and_a_stated_one_wins():
    raw = {"methods": ["ofb", "l1-channel", {"name": "ofb", "args": {"w_flops": 50.0}, "recipe": {"search_epochs": 3}}],
           "models": ["vit_cifar_tiny"], "datasets": ["digits"], "targets": {"flops": [0.5]}}
    ofb, l1, entry = [s.recipe.search_epochs for s in expand(raw).specs]
    assert (ofb, l1, entry) == (5, 1, 3) and isinstance(ofb, int)      # 5, not 5.0: the spec hash sees the number
    stated = expand({**raw, "recipe": {"search_epochs": 2}}).specs
    assert [s.recipe.search_epochs for s in stated] == [2, 2, 3]


def test_the_quick_suite_names_the_runs_a_plain_run_names():
    """quick.yaml states no search budget or growth criterion: its OFB, PASS and S²ViTE entries are
    plain runs of the methods (the committed records keep their names, so the reference leaderboard
    still matches)."""
    from sparsebench.cli.main import build_parser
    from sparsebench.cli.runs import _spec_from_args

    quick = {s.run_id for s in map(resolve, load_suite(REPO / "benchmarks" / "quick.yaml").specs)}
    for argv in (["--method", "ofb", "--model", "vit_cifar_tiny", "--target", "flops=0.5"],
                 ["--method", "pass", "--method-arg", "residual_mode=coupled", "--model", "resnet20_tiny",
                  "--target", "flops=0.5"],
                 ["--method", "s2vite", "--model", "vit_cifar_tiny", "--target", "flops=0.5"]):
        args = build_parser().parse_args(["run", *argv, "--dataset", "digits", "--img-size", "16", "--out", "unused",
                                          "--measure", "rounds=6"])      # quick.yaml's timing rounds
        run_id = resolve(_spec_from_args(args)).run_id
        assert run_id in quick and (REPO / "results" / "quick" / "records" / f"{run_id}.json").is_file()


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One results folder and dense-checkpoint cache for every plain run (a model's checkpoint once)."""
    return tmp_path_factory.mktemp("plain")


@pytest.mark.slow
@pytest.mark.parametrize("method,model,target", PAIRS, ids=[f"{m}-{model}" for m, model, _ in PAIRS])
def test_a_plain_run_of_each_seed_method_acts_and_says_so(method, model, target, shared, capsys):
    code = main(["run", "--method", method, "--model", model, "--dataset", "digits", "--target", target,
                 "--out", str(shared), "--quiet", "--no-latency", "--no-save-models"])
    printed = capsys.readouterr().out
    assert code == 0
    (path,) = [p for p in (shared / "records").glob(f"{method}__{model}__*.json")]
    record = json.loads(path.read_text())
    assert record["mechanism"]["acted"] is True, record["mechanism"]["reason"]
    assert record["spec"]["recipe"]["search_epochs"] == METHODS.get(method).factory.default_budget.get("search_epochs", 1)
    assert printed.rstrip("\n").splitlines()[-1].endswith("; mechanism acted")

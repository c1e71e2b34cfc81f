"""`sweep --smoke`: every (method, model, dataset, target) of a suite runs tiny on fabricated data
in the dataset's real on-disk format; a config error, an unsupported pair, a reference entry
missing a field and a run that raises each fail it, in one line; nothing reaches --out."""
import textwrap
from pathlib import Path

import pytest

from sparsebench.cli import main
from sparsebench.runners.smoke import SMOKE_BATCH, SMOKE_STEPS, run_smoke, settings, smoke_spec
from sparsebench.runners.suite import load_suite

SUITE = """
name: smoke-test
methods:
  - magnitude-global
  - {name: l1-channel, args: %s}
models: [resnet20]
datasets: [cifar10]
targets: {sparsity: [0.5, 0.9], flops: [0.5]}
seeds: [0, 1, 2]
recipe: {batch_size: 128, pretrain_epochs: 160, finetune_epochs: 40, search_epochs: 10, precision: bf16}
data: {val_fraction: 0.1, workers: 8}
"""


def write_suite(tmp_path, args="{scope: global}", text=SUITE):
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text % args if "%s" in text else text))
    return path


def one_line_error(capsys, *argv):
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("sparsebench: error: ")
    return err[0]


def test_every_setting_runs_tiny_on_the_real_format_and_nothing_reaches_out(tmp_path, capsys):
    path = write_suite(tmp_path)
    code = main(["sweep", str(path), "--smoke", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0
    # 2 sparsity targets + 1 FLOPs target, one seed each: 3 settings, each ran end to end
    assert "smoke smoke-test: 3 settings" in out and "3 ran end to end" in out and ", 0 failed" in out
    assert not (tmp_path / "out").exists()


def test_a_smoke_run_is_the_suite_run_made_tiny(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    todo = settings(suite.specs)
    assert len(todo) == 3 and {s.seed for s in todo} == {0}
    tiny = smoke_spec(todo[0], steps_per_epoch=5)
    assert tiny.model == "resnet20_tiny" and tiny.data.img_size == 16 and tiny.data.workers == 0
    r = tiny.recipe
    assert r.batch_size == SMOKE_BATCH and r.precision == "fp32"
    assert r.steps(r.pretrain_epochs, 5 * SMOKE_BATCH) == SMOKE_STEPS
    assert r.steps(r.finetune_epochs, 5 * SMOKE_BATCH) == SMOKE_STEPS
    assert (r.lr, r.weight_decay, r.optimizer) == (todo[0].recipe.lr, todo[0].recipe.weight_decay, "sgd")
    assert tiny.pretrained is None and not tiny.measure.latency


def test_a_phased_method_gets_a_step_per_phase(tmp_path):
    suite = load_suite(write_suite(tmp_path, text="""
        name: gap
        methods: [{name: gap-cyclic, args: {rounds: 5, num_groups: 3}}]
        models: [resnet20]
        datasets: [cifar10]
        targets: {sparsity: [0.9]}
        """))
    r = smoke_spec(suite.specs[0], steps_per_epoch=4).recipe
    assert r.steps(r.pretrain_epochs, 4 * SMOKE_BATCH) == 15
    default = load_suite(write_suite(tmp_path, text="""
        name: gap-default
        methods: [gap-cyclic]
        models: [resnet20]
        datasets: [cifar10]
        targets: {sparsity: [0.9]}
        """))                                  # rounds=None, chosen from the budget: one round of 3 phases
    r = smoke_spec(default.specs[0], steps_per_epoch=4).recipe
    assert r.steps(r.pretrain_epochs, 4 * SMOKE_BATCH) >= 3


def test_a_misspelled_method_argument_fails_in_one_line(tmp_path, capsys):
    path = write_suite(tmp_path, args="{scoep: global}")
    line = one_line_error(capsys, "sweep", str(path), "--smoke")
    assert "unknown argument 'scoep' for method 'l1-channel'" in line


def test_an_unsupported_pair_fails_in_one_line(tmp_path, capsys):
    path = write_suite(tmp_path, text=SUITE.replace("models: [resnet20]", "models: [resnet20, vit_cifar]")
                       .replace("- magnitude-global", "- {name: pass, models: [resnet20, vit_cifar]}"), args="{}")
    line = one_line_error(capsys, "sweep", str(path), "--smoke")
    assert "method 'pass' cannot run on model 'vit_cifar'" in line


def test_a_reference_missing_a_field_fails_in_one_line(tmp_path, capsys, monkeypatch):
    bad = tmp_path / "references.yaml"
    bad.write_text("references:\n  - {method: rigl, args: {}, model: resnet50, dataset: imagenet, target: sparsity=0.8,"
                   " top1: 75.1, top5: null, gmacs: null, flops_ratio: 0.42, reconstruction: false, match: null}\n")
    monkeypatch.setenv("SPARSEBENCH_REFERENCES", str(bad))
    line = one_line_error(capsys, "sweep", str(write_suite(tmp_path)), "--smoke")
    assert "missing field 'source'" in line


def test_a_run_that_raises_fails_the_smoke_and_the_others_still_run(tmp_path, capsys):
    from sparsebench.methods import METHODS, Method, register_method

    @register_method("test-missing-hook")
    class MissingHook(Method):
        granularity = "unstructured"

        def run(self, ctx):
            return ctx.model.no_such_hook()

    try:
        path = write_suite(tmp_path, text=SUITE.replace("- magnitude-global", "- test-missing-hook"), args="{}")
        code = main(["sweep", str(path), "--smoke"])
        out = capsys.readouterr().out
    finally:
        METHODS._entries.pop("test-missing-hook")
    assert code == 1
    failed = [line for line in out.splitlines() if line.startswith("SMOKE FAILED")]
    assert len(failed) == 2 and all("test-missing-hook resnet20 cifar10" in f and "no_such_hook" in f for f in failed)
    assert "1 ran end to end, 2 failed" in out

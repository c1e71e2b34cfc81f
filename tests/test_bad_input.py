"""Every value a user types is checked before any work: one line naming the key and what is
allowed, exit code 2, nothing in the results store. And good values typed as text are read."""
import os
import subprocess
import sys
import textwrap

import pytest

from sparsebench.cli import main
from sparsebench.errors import SpecError
from sparsebench.runners.suite import expand
from sparsebench.specs import DataSpec, MeasureSpec, Recipe, RunSpec, Target

RUN = ["run", "--method", "magnitude-layerwise", "--model", "resnet20_tiny", "--dataset", "digits",
       "--target", "sparsity=0.5", "--quiet"]

BAD_VALUES = [
    (["--recipe", "lr=inf"], "recipe lr", "finite number"),
    (["--recipe", "lr=nan"], "recipe lr", "finite number"),
    (["--recipe", "lr=fast"], "recipe lr", "finite number"),
    (["--recipe", "finetune_lr=-1e-3"], "finetune_lr", "finetune_lr > 0"),
    (["--recipe", "evals_per_epoch=0"], "evals_per_epoch", "evals_per_epoch > 0"),
    # more checks than steps in an epoch (19 on digits at batch 64) cannot be given: refused, not rounded
    (["--recipe", "evals_per_epoch=50"], "evals_per_epoch=50", "0 < evals_per_epoch <= 19"),
    (["--recipe", "batch_size=2.5"], "recipe batch_size", "a whole number"),
    (["--recipe", "batch_size=0"], "batch_size", "batch_size >= 1"),
    (["--recipe", "momentum=5"], "momentum", "0 <= momentum < 1"),
    (["--recipe", "momentum=1"], "momentum", "0 <= momentum < 1"),
    (["--recipe", "warmup_fraction=5"], "warmup_fraction", "0 <= warmup_fraction <= 1"),
    (["--recipe", "label_smoothing=1.5"], "label_smoothing", "0 <= label_smoothing < 1"),
    (["--recipe", "weight_decay=-0.1"], "weight_decay", "weight_decay >= 0"),
    (["--recipe", "pretrain_epochs=true"], "recipe pretrain_epochs", "finite number"),
    (["--method-arg", "skip_first=2"], "skip_first", "allowed: true, false"),
    (["--method-arg", "skip_first=maybe"], "skip_first", "allowed: true, false"),
    (["--target", "sparsity=nan"], "target sparsity", "finite number"),
    (["--target", "sparsity=1"], "sparsity", "0 < sparsity < 1"),
    (["--seed", "-1"], "seed", "0 <= seed < 2**31"),
    (["--seed", str(2 ** 40)], "seed", "0 <= seed < 2**31"),
    (["--threads", "0"], "threads", "threads >= 1"),
    (["--batch-sizes", "0", "8"], "batch_sizes", "batch_sizes >= 1"),
    (["--val-fraction", "1.5"], "val_fraction", "0 < val_fraction < 1"),
    (["--device", "nonsense"], "--device 'nonsense'", "allowed: cpu, cuda, cuda:N"),
    (["--device", "cuda:99"], "--device 'cuda:99'", "allowed: cpu"),
    (["--max-bad-samples", "-1"], "--max-bad-samples", "integer >= 0"),
]


@pytest.mark.parametrize("extra, key, allowed", BAD_VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_value_is_one_line_naming_key_and_allowed(tmp_path, capsys, extra, key, allowed):
    code = main([*RUN, *extra, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("sparsebench: error: ") and key in lines[0] and allowed in lines[0]
    assert not (tmp_path / "out" / "records").exists()


def test_cuda_without_a_gpu_is_refused_before_any_work(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    code = main([*RUN, "--device", "cuda", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "--device 'cuda' is not available here (no CUDA GPU); allowed: cpu" in err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_numbers_typed_as_text_are_read_as_numbers():
    from sparsebench.cli import _kv
    from sparsebench.runners.suite import recipe_for

    overrides = _kv(["lr=1e-3", "finetune_lr=2E-4", "batch_size=32", "skip=1.0e-2"], "--recipe")
    assert overrides["lr"] == "1e-3"                    # what YAML makes of it: a string
    recipe = recipe_for("cnn", {k: v for k, v in overrides.items() if k != "skip"}, {})
    assert recipe.lr == 1e-3 and recipe.finetune_lr == 2e-4 and recipe.batch_size == 32
    assert Recipe(batch_size="64", momentum="0").momentum == 0 and Recipe(batch_size=64.0).batch_size == 64
    assert Target("sparsity", "0.9").value == 0.9
    assert MeasureSpec(batch_sizes=("1", 8), latency="false").batch_sizes == (1, 8)
    assert DataSpec(img_size="16").img_size == 16


def test_ints_for_floats_keep_the_hash():
    """An int given for a float field stays an int: existing specs keep their hashes and record names."""
    assert Recipe(pretrain_epochs=15).pretrain_epochs == 15
    assert isinstance(Recipe(pretrain_epochs=15).pretrain_epochs, int)
    a = RunSpec("dense", "resnet20_tiny", "digits", recipe=Recipe(pretrain_epochs=15))
    assert a.hash == RunSpec.from_dict(a.to_dict()).hash


SUITE = dict(methods=["magnitude-global"], models=["resnet20_tiny"], datasets=["digits"], targets={"sparsity": [0.5]})


def test_a_suite_reads_1e_3_as_a_number(tmp_path):
    import yaml

    raw = yaml.safe_load(textwrap.dedent("""
        methods: [{name: magnitude-global, args: {skip_first: true}}]
        models: [resnet20_tiny]
        datasets: [digits]
        targets: {sparsity: ["0.5"]}
        recipe: {lr: 1e-3, finetune_lr: 5e-4}
    """))
    assert raw["recipe"]["lr"] == "1e-3"
    spec = expand(raw).specs[0]
    assert spec.recipe.lr == 1e-3 and spec.recipe.finetune_lr == 5e-4 and spec.target.value == 0.5


@pytest.mark.parametrize("change, message", [
    ({"recipe": {"lr": ".inf"}}, "recipe lr"),
    ({"recipe": {"momentum": 1.5}}, "0 <= momentum < 1"),
    ({"recipe": {"evals_per_epoch": 0}}, "evals_per_epoch > 0"),
    ({"recipe": {"batch_size": 2.5}}, "recipe batch_size"),
    ({"data": {"workers": 1.5}}, "data workers"),
    ({"measure": {"rounds": 0}}, "rounds >= 1"),
    ({"measure": {"latency": 2}}, "measure latency"),
    ({"targets": {"sparsity": ["lots"]}}, "target sparsity"),
    ({"seeds": [-1]}, "seed=-1"),
    ({"methods": [{"name": "magnitude-global", "args": {"skip_first": 2}}]}, "skip_first"),
])
def test_a_suite_refuses_bad_values_with_one_line(change, message):
    with pytest.raises(SpecError) as e:
        expand({**SUITE, **change})
    assert "\n" not in str(e.value) and message in str(e.value)


def test_run_ids_fit_name_max_whatever_the_names():
    spec = RunSpec("m" * 300, "resnet20_tiny", "x" * 200, seed=2 ** 31 - 1)
    name = f".{spec.run_id}.json.abcdefgh.tmp"            # the record's temp file, the longest name written
    assert len(name.encode()) < 255 and spec.run_id.endswith(spec.hash[:10])
    short = RunSpec("dense", "resnet20_tiny", "digits")
    assert short.run_id == f"dense__resnet20_tiny__digits__none__s0__{short.hash[:10]}"


@pytest.mark.parametrize("kind", ["under-a-file", "name-too-long", "path-too-long", "read-only"])
def test_an_unusable_out_is_one_line_before_any_work(tmp_path, capsys, kind):
    if kind == "under-a-file":
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "out"
    elif kind == "name-too-long":
        out = tmp_path / ("x" * 300)
    elif kind == "path-too-long":       # creatable, but records inside would pass PATH_MAX (a run lost at the end)
        out = tmp_path
        while len(str(out)) < 4006 - 201:
            out = out / ("d" * 200)
        out = out / ("e" * (4006 - len(str(out)) - 1))
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders")
        (tmp_path / "ro").mkdir(mode=0o555)
        out = tmp_path / "ro" / "out"
    code = main([*RUN, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "--out" in err, err
    assert not list(tmp_path.rglob("records")) and not list(tmp_path.rglob("checkpoints"))


def test_a_closed_pipe_ends_quietly():
    read, write = os.pipe()
    os.close(read)                      # the reader is gone before the first line, as with `| head -0`
    proc = subprocess.run([sys.executable, "-m", "sparsebench", "list"], stdout=write, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    os.close(write)
    assert proc.stderr == "" and proc.returncode == 141


def test_sweep_jobs_must_be_positive(tmp_path, capsys):
    suite = tmp_path / "s.yaml"
    suite.write_text("methods: [dense]\nmodels: [resnet20_tiny]\ndatasets: [digits]\n")
    code = main(["sweep", str(suite), "--out", str(tmp_path / "out"), "--jobs", "0", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "bad --jobs 0; allowed: auto or an integer >= 1" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()

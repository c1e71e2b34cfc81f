"""The command line: bad input is one line, exit 2, nothing written; good input works."""
import json
import subprocess
import sys
import textwrap

import pytest

from sparsebench.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


BAD_RUNS = [
    (["--method", "nope"], "unknown method 'nope'; allowed:"),
    (["--model", "resnet1000"], "unknown model 'resnet1000'; allowed:"),
    (["--dataset", "mnist9"], "unknown dataset 'mnist9'; allowed:"),
    (["--target", "sparsity=1.5"], "sparsity=1.5 is out of range"),
    (["--target", "flops=0.5"], "takes --target sparsity=S"),
    (["--method-arg", "colour=red"], "unknown argument 'colour'"),
    (["--method-arg", "distribution=weird"], "bad value 'weird'"),
    (["--recipe", "optimizer=lion"], "unknown optimizer 'lion'"),
    (["--recipe", "batch_size=5000"], "batch_size=5000 is larger than the training split"),
    (["--recipe", "colour=red"], "unknown key 'colour'"),
]


@pytest.mark.parametrize("override, message", BAD_RUNS)
def test_bad_run_input_is_one_line_exit_2_and_no_record(tmp_path, capsys, override, message):
    argv = {"--method": "magnitude-layerwise", "--model": "resnet20_tiny", "--dataset": "digits",
            "--target": "sparsity=0.5"}
    extra = []
    for i in range(0, len(override), 2):
        if override[i] in argv:
            argv[override[i]] = override[i + 1]
        else:
            extra += override[i:i + 2]
    args = ["run", *[x for kv in argv.items() for x in kv], *extra, "--out", str(tmp_path / "out"), "--quiet"]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("sparsebench: error: ") and message in lines[0]
    assert not (tmp_path / "out" / "records").exists()


def test_unsupported_model_is_one_line_exit_2(tmp_path, capsys):
    from sparsebench.methods import METHODS, Method, register_method

    @register_method("test-cnn-only")
    class CnnOnly(Method):
        granularity = "unstructured"

        def supports(self, model, family):
            return family == "cnn"

    try:
        code, _, err = run_cli(capsys, "run", "--method", "test-cnn-only", "--model", "vit_cifar_tiny", "--dataset",
                               "digits", "--target", "sparsity=0.5", "--out", str(tmp_path), "--quiet")
    finally:
        METHODS._entries.pop("test-cnn-only")
    assert code == 2 and "does not support model 'vit_cifar_tiny'" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "records").exists()


@pytest.mark.parametrize("content, message", [
    ("methods: [dense]\nmodels: [resnet20_tiny]\ndatasets: [digits]\ncolour: red\n", "unknown key 'colour'"),
    ("methods: [dense\n", "not valid YAML"),
    ("methods: []\nmodels: [resnet20_tiny]\ndatasets: [digits]\n", "'methods' must be a non-empty list"),
    ("methods: [gmp]\nmodels: [resnet20_tiny]\ndatasets: [digits]\ntargets: {flops: [0.5]}\n", "needs targets.sparsity"),
    ("methods: [gmp]\nmodels: [resnet20_tiny]\ndatasets: [digits]\ntargets: {sparsity: [2]}\n", "out of range"),
    ("methods: [dense]\nmodels: [nope]\ndatasets: [digits]\n", "unknown model 'nope'"),
])
def test_malformed_suites_fail_cleanly(tmp_path, capsys, content, message):
    suite = tmp_path / "suite.yaml"
    suite.write_text(content)
    code, out, err = run_cli(capsys, "sweep", str(suite), "--out", str(tmp_path / "out"), "--quiet")
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


TINY_SUITE = textwrap.dedent("""
    name: tiny
    methods: [dense, magnitude-global, l1-channel]
    models: [resnet20_tiny, vit_cifar_tiny]
    datasets: [digits]
    targets: {sparsity: [0.5], flops: [0.5]}
    seeds: [0]
    recipe: {pretrain_epochs: 1, finetune_epochs: 0.5, search_epochs: 0.5}
    data: {img_size: 16}
    measure: {batch_sizes: [1, 8], min_run_time: 0.01, rounds: 2}
""")


def test_sweep_resumes_and_never_duplicates(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_SUITE)
    out = tmp_path / "out"
    code, text, _ = run_cli(capsys, "sweep", str(suite), "--jobs", "1", "--out", str(out), "--quiet")
    assert code == 0
    assert "6 runs, 0 already done, 6 to run" in text
    records = sorted((out / "records").glob("*.json"))
    assert len(records) == 6
    mtimes = [r.stat().st_mtime_ns for r in records]
    for name in ("leaderboard.md", "leaderboard.csv", "leaderboard.html", "accuracy_vs_flops.png",
                 "accuracy_vs_speedup.png", "measured_vs_theoretical.png"):
        assert (out / name).exists()
    # a record deleted (as if its run was interrupted) is the only one re-run
    records[0].unlink()
    code, text, _ = run_cli(capsys, "sweep", str(suite), "--jobs", "1", "--out", str(out), "--quiet")
    assert code == 0 and "6 runs, 5 already done, 1 to run" in text
    assert [r.stat().st_mtime_ns for r in records[1:]] == mtimes[1:]
    assert len(list((out / "records").glob("*.json"))) == 6
    # leaderboard and plot rebuild from records alone
    code, text, _ = run_cli(capsys, "leaderboard", str(out))
    assert code == 0 and "magnitude-global" in text and "l1-channel" in text
    code, text, _ = run_cli(capsys, "plot", str(out), "--output", str(tmp_path / "p.png"))
    assert code == 0 and (tmp_path / "p.png").stat().st_size > 10_000
    # --rerun redoes finished runs; --compare prints the differences against a reference
    import shutil

    shutil.copytree(out / "records", tmp_path / "ref" / "records")
    code, text, _ = run_cli(capsys, "sweep", str(suite), "--jobs", "1", "--out", str(out), "--rerun", "--compare",
                            str(tmp_path / "ref"), "--progress-interval", "0")
    assert code == 0 and "6 runs, 6 already done, 6 to run" in text
    assert [r.stat().st_mtime_ns for r in records[1:]] != mtimes[1:]
    assert "estimated" in text and "from the reference records' measured step costs" in text
    assert "[tiny] 6/6 runs" in text and "ETA" in text          # plain lines: capsys is not a terminal
    assert "6 runs in common with" in text and "top1 ref" in text
    written = [p for p in out.rglob("*") if p.is_file() and not {"records", "checkpoints", "models", "tb"} & set(p.parts)
               and not p.name.endswith(".lock")]           # the runs' own outputs (tb: their live curves)
    assert len(list((out / "models").glob("*.safetensors"))) == 6 and "6 of 6 runs' models saved" in text
    # the last lines say where the results are, grouped, and how to open the report: no list of every file
    lines = text.splitlines()
    where = next(line for line in lines if " files under " in line)
    site = [p for p in written if "report" in p.relative_to(out).parts]
    assert where == (f"{len(written) + 12} files under {out}: records/ (6), models/ (6), report/ ({len(site)}), "
                     "leaderboard.{csv,html,md}, 3 plots (accuracy_vs_flops.png, accuracy_vs_speedup.png, "
                     "measured_vs_theoretical.png)")
    assert lines[-1].startswith(f"open the report: xdg-open {out / 'report' / 'index.html'}")
    closing = lines[next(i for i, line in enumerate(lines) if line.startswith("sweep wall time")):]
    assert max(map(len, closing)) < 300 and not any(line.startswith("wrote ") for line in lines)
    assert (out / "report" / "index.html").is_file()


def test_dry_run_lists_runs_and_cost(tmp_path, capsys):
    """One estimate throughout: the runs' steps add up to each (method, model) line and to the suite's
    total, and a method entry's own recipe (more search epochs) is counted."""
    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_SUITE.replace("methods: [dense, magnitude-global, l1-channel]",
                                        "methods: [dense, magnitude-global, {name: l1-channel, recipe: {search_epochs: 4}}]"))
    code, text, _ = run_cli(capsys, "sweep", str(suite), "--dry-run")
    assert code == 0 and "suite tiny: 6 runs, 2 dense checkpoints" in text
    runs = [line.split() for line in text.splitlines() if "__digits__" in line]
    assert len(runs) == 6
    steps = {line[0].split("__")[0] + " " + line[0].split("__")[1]: int(line[1]) for line in runs if "__none__" not in line[0]}
    pairs = {" ".join(line.split()[:2]): line.split() for line in text.split("device-hours by method", 1)[1].splitlines()}
    assert int(pairs["l1-channel resnet20_tiny"][3]) == steps["l1-channel resnet20_tiny"]
    assert int(pairs["magnitude-global resnet20_tiny"][3]) == steps["magnitude-global resnet20_tiny"]
    # l1-channel searches 4 epochs (its entry's recipe), magnitude-global the suite's 0.5: more steps
    assert steps["l1-channel resnet20_tiny"] > steps["magnitude-global resnet20_tiny"]


def test_run_then_rerun_is_skipped(tmp_path, capsys):
    args = ["run", "--method", "random", "--model", "resnet20_tiny", "--dataset", "digits", "--target",
            "sparsity=0.5", "--recipe", "pretrain_epochs=0.5", "--recipe", "finetune_epochs=0.5",
            "--out", str(tmp_path), "--quiet", "--no-latency", "--method-arg", "distribution=erk"]
    code, text, _ = run_cli(capsys, *args)
    assert code == 0 and "wrote" in text and "sparsity 0.5" in text
    code, text, _ = run_cli(capsys, *args)
    assert code == 0 and "already done" in text


def test_list_and_flops(capsys):
    code, text, _ = run_cli(capsys, "list")
    assert code == 0
    for name in ("gmp", "l1-channel", "dense-small", "resnet20", "deit_small", "digits"):
        assert name in text
    code, text, _ = run_cli(capsys, "flops", "resnet18", "--json")
    data = json.loads(text)
    assert data["macs"] == pytest.approx(1.82e9, rel=0.01) and data["flops"] == 2 * data["macs"]
    code, text, _ = run_cli(capsys, "flops", "resnet34")          # any torchvision / timm name
    assert code == 0 and "GMACs" in text
    code, _, err = run_cli(capsys, "flops", "no_such_net")
    assert code == 2 and "unknown model 'no_such_net'" in err


def test_console_script_exit_code():
    out = subprocess.run([sys.executable, "-m", "sparsebench.cli", "run", "--method", "x", "--model", "resnet20_tiny",
                          "--dataset", "digits", "--out", "/nonexistent/never"], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "unknown method 'x'" in out.stderr


def test_parallel_sweep_and_shards_cover_the_suite_once(tmp_path, capsys):
    suite = tmp_path / "tiny.yaml"
    suite.write_text(TINY_SUITE)
    out = tmp_path / "out"
    code, text, _ = run_cli(capsys, "sweep", str(suite), "--out", str(out), "--quiet", "--shard", "0/2", "--jobs", "2")
    assert code == 0
    first = {p.name for p in (out / "records").glob("*.json")}
    code, text, _ = run_cli(capsys, "sweep", str(suite), "--out", str(out), "--quiet", "--shard", "1/2")
    assert code == 0
    second = {p.name for p in (out / "records").glob("*.json")} - first
    assert len(first) + len(second) == 6            # disjoint shards that cover the suite
    assert len(list((out / "checkpoints").glob("dense-*.pt"))) == 2
    code, _, err = run_cli(capsys, "sweep", str(suite), "--out", str(out), "--shard", "2/2")
    assert code == 2 and "bad --shard '2/2'" in err


def test_a_failing_run_does_not_stop_the_sweep(tmp_path, capsys):
    from sparsebench.methods import METHODS, Method, register_method

    @register_method("test-fails")
    class Fails(Method):
        granularity = "unstructured"

        def run(self, ctx):
            raise RuntimeError("method bug")

    suite = tmp_path / "s.yaml"
    suite.write_text(TINY_SUITE.replace("methods: [dense, magnitude-global, l1-channel]",
                                        "methods: [test-fails, magnitude-global]")
                     .replace("models: [resnet20_tiny, vit_cifar_tiny]", "models: [resnet20_tiny]"))
    try:
        code, text, err = run_cli(capsys, "sweep", str(suite), "--jobs", "1", "--out", str(tmp_path / "out"), "--quiet")
    finally:
        METHODS._entries.pop("test-fails")
    assert code == 1 and "FAILED test-fails resnet20_tiny digits sparsity=0.5 seed 0: RuntimeError: method bug" in err
    assert "1 done, 1 failed, 0 skipped" in text
    from sparsebench.store import load_records

    records = {r.method: r for r in load_records(tmp_path / "out")}
    assert set(records) == {"magnitude-global", "test-fails"} and records["magnitude-global"].status == "ok"
    failed = records["test-fails"]          # recorded, with its error and no metrics
    assert failed.status == "failed" and "RuntimeError: method bug" in failed.error and failed.test_top1 is None


def test_sweep_on_missing_data_is_one_error(tmp_path, capsys):
    suite = tmp_path / "c.yaml"
    suite.write_text("methods: [dense]\nmodels: [resnet20_tiny]\ndatasets: [cifar10]\n")
    code, _, err = run_cli(capsys, "sweep", str(suite), "--out", str(tmp_path / "out"), "--quiet",
                           "--data-root", str(tmp_path / "nodata"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cifar10" in err and str(tmp_path / "nodata") in err and "--download" in err
    assert not (tmp_path / "out" / "records").exists()


def test_readers_of_an_empty_results_folder_say_so_in_one_line(tmp_path, capsys):
    (tmp_path / "records").mkdir()
    (tmp_path / "records" / "broken.json").write_text("{")
    for command, tail in ((["leaderboard"], []), (["plot"], []), (["report"], []), (["compare"], ["a", "b"])):
        assert main([*command, str(tmp_path), *tail]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"sparsebench: error: no readable run records in '{tmp_path}' (expected JSON records " \
                          f"under '{tmp_path / 'records'}')"


def test_a_run_recorded_twice_counts_once_with_no_fake_interval(tmp_path, capsys, caplog):
    import shutil

    from conftest import make_record
    from sparsebench.store import RecordStore

    store = RecordStore(tmp_path)
    older = make_record("random", 0, 0.8, created="2025-01-01T00:00:00")
    newer = make_record("random", 0, 0.9, created="2025-02-01T00:00:00", run_id="merged-copy",
                        spec_hash=older.spec_hash)
    store.write(older)
    store.write(newer)
    shutil.copy(store.path(older.run_id), tmp_path / "records" / "renamed.json")
    records = store.load_all()
    assert [r.test_top1 for r in records] == [0.9]                  # the newest copy of the run, once
    assert sum("another record of run" in m for m in caplog.messages) == 2
    assert main(["leaderboard", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "| random" in line)
    assert "|         90 |" in row and "±" not in row               # one seed: no interval at all


def test_leaderboard_equal_cost_view_and_a_bad_tolerance(tmp_path, capsys):
    from sparsebench.store.records import RecordStore
    from conftest import make_record

    RecordStore(tmp_path).write(make_record("random", 0, 0.8))
    code, out, _ = run_cli(capsys, "leaderboard", str(tmp_path), "--equal-cost", "steps")
    assert code == 0 and "| cost " in out and "≈0 steps" in out
    code, out, err = run_cli(capsys, "leaderboard", str(tmp_path), "--equal-cost", "macs", "--cost-tolerance", "1.5")
    assert code == 2 and err.strip().count("\n") == 0 and "--cost-tolerance must be in [0, 1), got 1.5" in err


def test_run_summary_names_the_realization_beside_the_measured_speedup(capsys):
    from conftest import make_record
    from sparsebench.cli.runs import _print_run_summary
    from sparsebench.store.record import Realization

    auto = Realization(True, "auto", None, "float32", {"sparse_layers": 3, "layers": []})
    _print_run_summary(make_record("magnitude-global", realizable=True, speedup=1.25, realization=auto))
    assert "measured 1.25× (auto, eager, cpu: Test CPU)" in capsys.readouterr().out
    _print_run_summary(make_record("l1-channel", kind="flops", realizable=True, speedup=1.5))
    assert "measured 1.50× (cpu: Test CPU)" in capsys.readouterr().out


def test_run_summary_carries_the_mechanism_verdict(capsys):
    from conftest import make_record
    from sparsebench.cli.runs import _print_run_summary
    from sparsebench.store.record import Mechanism

    acted = Mechanism(True, True, "acted: updates = 4 (>= 1)")
    idle = Mechanism(True, False, "did not act: eliminated_fraction = 0 (needs >= 0.5); 9 forced")
    control = Mechanism(True, False, "null control (search=False): the mechanism is switched off", control=True)
    for mechanism, said in [(acted, "; mechanism acted"),
                            (idle, "; mechanism DID NOT ACT: eliminated_fraction = 0 (needs >= 0.5); 9 forced"),
                            (control, "; mechanism null control (search=False): the mechanism is switched off"),
                            (None, "; mechanism not recorded")]:
        _print_run_summary(make_record("ofb", kind="flops", mechanism=mechanism))
        assert capsys.readouterr().out.rstrip("\n").endswith(said)
    _print_run_summary(make_record("random"))
    assert capsys.readouterr().out.rstrip("\n").endswith("; mechanism not recorded")
    _print_run_summary(make_record("random", status="missed_target", mechanism=Mechanism(False, None, "baseline")))
    out = capsys.readouterr().out
    assert "MISSED TARGET" in out and out.rstrip("\n").endswith("; mechanism baseline: no mechanism")


NOT_ACTING = textwrap.dedent("""
    name: idle
    methods: [rigl]
    models: [resnet20_tiny]
    datasets: [digits]
    targets: {sparsity: [0.5, 0.8]}
    recipe: {pretrain_epochs: 0.5, finetune_epochs: 0.2, search_epochs: 0.2}
    data: {img_size: 16}
    measure: {latency: false}
""")


def test_a_sweep_says_which_runs_did_not_act_as_they_finish_and_at_the_end(tmp_path, capsys, monkeypatch):
    from sparsebench.methods import METHODS

    # thresholds no run reaches: every run's mechanism is judged "did not act"
    monkeypatch.setattr(METHODS.get("rigl").factory, "mechanism_thresholds", {"updates": 10 ** 6})
    suite = tmp_path / "idle.yaml"
    suite.write_text(NOT_ACTING)
    code, text, _ = run_cli(capsys, "sweep", str(suite), "--jobs", "1", "--out", str(tmp_path / "out"),
                            "--progress-interval", "3600", "--no-save-models")
    assert code == 0
    lines = text.splitlines()
    progress = [line for line in lines if line.startswith("[idle] ")]
    # the first run's line is due to its verdict alone (the interval would hold it back)
    assert len(progress) == 2 and progress[0].startswith("[idle] 1/2 runs")
    assert "; last: rigl resnet20_tiny sparsity=0.5: did not act: updates = " in progress[0]
    assert "(needs >= 1e+06)" in progress[0]
    closing = next(line for line in lines if line.endswith("; listed apart, never ranked as the method"))
    assert closing.startswith("2 did not act: rigl resnet20_tiny sparsity=0.5 (updates = ")
    assert "rigl resnet20_tiny sparsity=0.8 (updates = " in closing and closing.endswith("; listed apart, never ranked as the method")


def test_run_with_tracker_mlflow_logs_the_report_too(tmp_path, capsys):
    pytest.importorskip("mlflow")
    pytest.importorskip("tensorboard")
    from mlflow.tracking import MlflowClient

    code, text, err = run_cli(capsys, "run", "--method", "magnitude-global", "--model", "resnet20_tiny", "--dataset",
                              "digits", "--target", "sparsity=0.5", "--recipe", "pretrain_epochs=0.5", "--recipe",
                              "finetune_epochs=0.5", "--out", str(tmp_path), "--quiet", "--no-latency",
                              "--tracker", "mlflow")
    assert code == 0, err
    client = MlflowClient(f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}")     # the default store
    [run] = client.search_runs([client.get_experiment_by_name("sparsebench").experiment_id])
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    run_id = run.data.tags["sparsebench.run_id"]
    assert {f"{run_id}.json", f"{run_id}.safetensors", "report"} <= names and run.info.status == "FINISHED"
    pages = {a.path for a in client.list_artifacts(run.info.run_id, "report/runs")}
    assert f"report/runs/{run_id}.html" in pages


def test_tracker_uri_without_mlflow_is_a_one_line_error(tmp_path, capsys):
    code, _, err = run_cli(capsys, "run", "--method", "random", "--model", "resnet20_tiny", "--dataset", "digits",
                           "--target", "sparsity=0.5", "--out", str(tmp_path), "--tracker-uri", "sqlite:///x.db")
    assert code == 2 and "--tracker-uri is for --tracker mlflow" in err

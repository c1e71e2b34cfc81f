"""Watching a run: live TensorBoard curves (resumed runs continue them), MLflow, resource use, progress lines."""
import io
import json
import os
import time
from pathlib import Path

import pytest
import torch

import sparsebench.training.watch as watch_module
from sparsebench.measure import resources
from sparsebench.runners.pipeline import RunOptions, execute
from sparsebench.specs import MeasureSpec
from sparsebench.store.record import RunRecord

from conftest import Killed, kill_after, make_record, tiny_spec

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

NO_LATENCY = MeasureSpec(latency=False, threads=1)


@pytest.fixture
def fast_watch(monkeypatch):
    """Every step flushes its interval (throughput, densities) and resources are sampled every 50 ms."""
    monkeypatch.setattr(watch_module, "FLUSH_SECONDS", 0.0)
    monkeypatch.setattr(watch_module, "SAMPLE_SECONDS", 0.05)


def scalars(out: Path, run_id: str, stage: str) -> dict:
    """{tag: [(step, value), ...]} as TensorBoard's own reader reads the stage's event files."""
    reader = EventAccumulator(str(out / "tb" / run_id / stage), size_guidance={"scalars": 0})
    reader.Reload()
    return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in reader.Tags()["scalars"]}


def test_a_run_writes_its_curves_as_tensorboard_event_files(tmp_path, fast_watch):
    spec = tiny_spec("rigl", target="sparsity=0.8", method_args=(("delta_t", 3),), measure=NO_LATENCY)
    record = execute(spec, RunOptions(out=tmp_path, checkpoint_every=4))
    assert sorted(p.name for p in (tmp_path / "tb" / record.run_id).iterdir()) == ["dense", "finetune", "method"]
    method = scalars(tmp_path, record.run_id, "method")
    for tag in ("train/loss", "train/lr", "train/steps_per_second", "train/images_per_second",
                "train/loader_wait_fraction", "density/all", "events/topology/swapped",
                "resources/cpu_percent", "resources/rss_mb"):
        assert tag in method, tag
    assert [s for s, _ in method["train/loss"]] == list(range(1, record.cost.method_steps + 1))
    curve = record.curves["method"]
    assert [round(v, 4) for _, v in method["train/loss"]] == [round(v, 4) for v in curve["loss"]]
    topology = [e[0] for e in curve["events"] if e[1] == "topology"]
    assert [s for s, _ in method["events/topology/swapped"]] == topology and topology
    assert any(t.startswith("density/layer") for t in method)
    assert 0.15 < method["density/all"][-1][1] < 0.25            # sparsity 0.8
    finetune = scalars(tmp_path, record.run_id, "finetune")
    assert [s for s, _ in finetune["val/top1"]] == [s for s, _ in record.curves["finetune"]["val"]]
    dense = scalars(tmp_path, record.run_id, "dense")
    assert len(dense["train/loss"]) == record.cost.dense_pretrain_steps


@pytest.mark.parametrize("method, target, args", [
    ("rigl", "sparsity=0.8", {"delta_t": 3}),           # killed between topology updates
    ("gap-cyclic", "sparsity=0.8", {}),                 # killed in its second phase: the first is reloaded whole
])
def test_a_resumed_run_continues_the_same_curves_without_duplicates(tmp_path, monkeypatch, method, target, args):
    spec = tiny_spec(method, target=target, method_args=tuple(sorted(args.items())), measure=NO_LATENCY)
    reference = execute(spec, RunOptions(out=tmp_path / "ref", checkpoint_every=4))
    options = RunOptions(out=tmp_path / "run", checkpoint_every=4)
    restore = kill_after(monkeypatch, reference.cost.dense_pretrain_steps + 7)     # saved at 4, killed at 7
    with pytest.raises(Killed):
        execute(spec, options)
    restore()
    resumed = execute(spec, options)
    assert resumed.cost.resumed_fits >= 1
    for stage in ("method", "finetune"):
        want = scalars(tmp_path / "ref", reference.run_id, stage)
        got = scalars(tmp_path / "run", resumed.run_id, stage)
        for tag in ("train/loss", "train/lr", "val/top1") + tuple(t for t in want if t.startswith("events/")):
            if tag not in want:
                continue
            steps = [s for s, _ in got[tag]]
            assert steps == [s for s, _ in want[tag]], (stage, tag)      # every step once, in order
            assert [round(v, 5) for _, v in got[tag]] == [round(v, 5) for _, v in want[tag]], (stage, tag)


def test_the_record_carries_each_stages_resource_use(tmp_path, fast_watch):
    record = execute(tiny_spec("gmp", target="sparsity=0.6", measure=NO_LATENCY), RunOptions(out=tmp_path))
    used = record.resources
    assert used["source"] in ("psutil", "/proc") and used["sample_seconds"] == 0.05
    assert set(used["stages"]) == {"dense", "method", "finetune"}
    method = used["stages"]["method"]
    assert method["steps"] == record.cost.method_steps
    assert 0.0 <= method["loader_wait_fraction"] < 1.0
    assert method["rss_mb_peak"] > 50 and method["samples"] >= 1 and method["cpu_percent_mean"] >= 0
    assert method["gpu_util_percent_mean"] is None             # a CPU run
    again = RunRecord.from_json(json.dumps(record.to_dict()))
    assert again.resources == record.resources


def test_a_record_from_before_resources_reads_them_as_none():
    record = make_record()
    old = record.to_dict()
    old.pop("resources", None)
    assert RunRecord.from_dict(old).resources is None


def test_without_tensorboard_a_run_notes_it_in_one_line_and_goes_on(tmp_path, monkeypatch, capsys):
    def missing(*args, **kwargs):
        raise ImportError("No module named 'tensorboard'")

    monkeypatch.setattr(watch_module, "TensorBoardTracker", missing)
    record = execute(tiny_spec("magnitude-global", measure=NO_LATENCY), RunOptions(out=tmp_path))
    assert record.status == "ok" and not (tmp_path / "tb").exists()
    notes = [line for line in capsys.readouterr().err.splitlines() if "tensorboard" in line]
    assert len(notes) == 1 and "not installed" in notes[0]


def test_tracker_none_writes_no_event_files(tmp_path):
    execute(tiny_spec("magnitude-global", measure=NO_LATENCY), RunOptions(out=tmp_path, tracker="none"))
    assert not (tmp_path / "tb").exists()


def test_mlflow_run_has_the_params_metrics_and_artifacts(tmp_path, fast_watch):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'store.db'}"
    spec = tiny_spec("gmp", target="sparsity=0.6", measure=NO_LATENCY)
    record = execute(spec, RunOptions(out=tmp_path / "out", tracker="mlflow", tracker_uri=uri, save_model=True))
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("sparsebench")
    [run] = client.search_runs([experiment.experiment_id], f"tags.`sparsebench.run_id` = '{record.run_id}'")
    assert run.info.status == "FINISHED"
    assert run.data.params["method"] == "gmp" and run.data.params["target.value"] == "0.6"
    assert run.data.params["recipe.batch_size"] == str(spec.recipe.batch_size)
    history = client.get_metric_history(run.info.run_id, "method/train/loss")
    assert sorted(m.step for m in history) == list(range(1, record.cost.method_steps + 1))
    assert "finetune/val/top1" in run.data.metrics and "method/density/all" in run.data.metrics
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert f"{record.run_id}.json" in names and f"{record.run_id}.safetensors" in names
    assert (tmp_path / "out" / "tb" / record.run_id / "method").is_dir()     # TensorBoard as well
    assert any((tmp_path / "out" / "mlflow-artifacts").rglob(f"{record.run_id}.json"))   # not ./mlruns


def test_resource_samples_from_proc_without_psutil(monkeypatch):
    monkeypatch.setattr(resources, "_psutil", lambda: None)
    sampler = resources.ResourceSampler(lambda sample: None, torch.device("cpu"), every=60)
    end = time.process_time() + 0.2
    while time.process_time() < end:            # busy: the next sample sees CPU time
        pass
    sample = sampler.sample()
    assert sample["cpu_percent"] > 10
    rss_kb = int(next(line for line in Path("/proc/self/status").read_text().splitlines()
                      if line.startswith("VmRSS")).split()[1])
    # the process's own resident memory, plus that of any child it has (loader workers; in a full test
    # session, the sweep tests' fork server): never less than its own
    assert sample["rss_mb"] >= 0.8 * rss_kb / 1024
    assert resources.source_name() == "/proc"


def test_a_child_process_counts_in_cpu_and_memory(monkeypatch):
    """Loader workers are child processes: their CPU time and memory are the run's."""
    monkeypatch.setattr(resources, "_psutil", lambda: None)
    pid = os.fork()
    if pid == 0:        # the child burns a CPU for a second
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            pass
        os._exit(0)
    try:
        cpu_before, _ = resources.process_tree_usage()
        time.sleep(0.5)
        cpu_after, _ = resources.process_tree_usage()
        assert cpu_after - cpu_before > 0.05      # the parent slept; a loaded machine gives the child less
    finally:
        os.waitpid(pid, 0)


class _Trainer:
    stage, position, schedule_steps = "finetune", 250, 1000
    budget = None


def test_progress_line_names_stage_step_eta_and_last_val():
    line = watch_module.progress_line(_Trainer(), 0.5, 0.7123)
    assert line == "finetune step 250/1000 (25%), 0.500 s/step, ETA 6m 15s, last val top-1 71.23%"


def test_progress_lines_are_printed_every_interval_with_the_stages_step_time_and_last_val(tmp_path):
    stream = io.StringIO()
    watch = watch_module.RunWatch([], torch.device("cpu"), sample_every=0, progress_every=0.0, stream=stream)
    trainer = _Trainer()
    watch.after_step(trainer, 64, 0.01, 0.1)        # the first step starts the interval: no line yet
    watch.log("dense").val(250, 0.9)                 # another stage's validation is not this one's
    watch.after_step(trainer, 64, 0.01, 0.3)
    watch.log("finetune").val(250, 0.5)
    watch.after_step(trainer, 64, 0.01, 0.2)
    lines = stream.getvalue().splitlines()
    assert lines == ["finetune step 250/1000 (25%), 0.200 s/step, ETA 2m 30s",
                     "finetune step 250/1000 (25%), 0.200 s/step, ETA 2m 30s, last val top-1 50.00%"]
    watch.close()


def test_a_run_keeps_its_progress_for_a_sweep_while_it_runs_and_removes_it_after(tmp_path, fast_watch, monkeypatch):
    from sparsebench.runners.pipeline import progress_dir
    from sparsebench.training.trainer import Trainer

    seen = []
    original = Trainer.train_step

    def step(self):
        out = original(self)
        seen.extend(watch_module.running_runs(progress_dir(tmp_path)))
        return out

    monkeypatch.setattr(Trainer, "train_step", step)
    record = execute(tiny_spec("gmp", target="sparsity=0.6", measure=NO_LATENCY), RunOptions(out=tmp_path))
    method = [s for s in seen if s["stage"] == "method"]
    assert method and all(s["label"] == "gmp resnet20_tiny sparsity=0.6" for s in method)
    assert method[-1]["step"] == record.cost.method_steps and method[-1]["total"] >= record.cost.method_steps
    assert method[-1]["eta_seconds"] >= 0 and method[-1]["seconds_per_step"] > 0
    finetune = [s for s in seen if s["stage"] == "finetune"]
    assert finetune[-1]["last_val"] is not None or len(record.curves["finetune"]["val"]) <= 1
    assert watch_module.running_runs(progress_dir(tmp_path)) == []       # finished: no longer running


def test_a_stale_status_file_is_a_killed_run_and_left_out(tmp_path):
    fresh, stale = tmp_path / "a.json", tmp_path / "b.json"
    watch_module.write_status(fresh, "gmp resnet20_tiny sparsity=0.6", _Trainer(), 0.5, 0.7)
    watch_module.write_status(stale, "rigl resnet20_tiny sparsity=0.8", _Trainer(), 0.5, None)
    os.utime(stale)
    data = json.loads(stale.read_text())
    stale.write_text(json.dumps({**data, "updated": time.time() - 3600}))
    [running] = watch_module.running_runs(tmp_path)
    assert watch_module.describe_running(running) == "gmp resnet20_tiny sparsity=0.6: finetune 250/1000, ETA 6m 15s, val 70.00%"


class _FakeNvml:
    """pynvml as far as the sampler reads it: device 0 at 37 % utilisation."""

    class _Rates:
        gpu = 37

    def nvmlInit(self):
        pass

    def nvmlDeviceGetHandleByIndex(self, index):
        assert index == 0
        return "handle-0"

    def nvmlDeviceGetUtilizationRates(self, handle):
        assert handle == "handle-0"
        return self._Rates()


@pytest.mark.parametrize("nvml", [True, False])
def test_on_cuda_the_stage_records_gpu_utilisation_and_memory(monkeypatch, nvml):
    """No GPU needed: torch.cuda's counters and NVML are stood in for."""
    import sys

    if nvml:
        monkeypatch.setitem(sys.modules, "pynvml", _FakeNvml())
    else:
        monkeypatch.setitem(sys.modules, "pynvml", None)        # import fails: torch's counters only
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (6 * 2 ** 30, 8 * 2 ** 30))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 1536 * 2 ** 20)
    watch = watch_module.RunWatch([], torch.device("cuda:0"), sample_every=0.02, flush_every=0.0)

    class Step(_Trainer):
        stage, hooks = "method", []

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        watch.after_step(Step(), 64, 0.005, 0.01)
        time.sleep(0.01)
        if watch.stages["method"].samples >= 3:
            break
    used = watch.resources()
    watch.close()
    method = used["stages"]["method"]
    assert method["gpu_mem_used_mb_peak"] == 2048.0 and method["gpu_peak_allocated_mb"] == 1536.0
    assert method["loader_wait_fraction"] == 0.5
    if nvml:
        assert used["gpu_source"] == "nvml" and method["gpu_util_percent_mean"] == 37.0
    else:
        assert used["gpu_source"] == "torch" and method["gpu_util_percent_mean"] is None


def test_only_rank_0_watches_a_run(tmp_path, monkeypatch):
    import sparsebench.runners.pipeline as pipeline

    spec = tiny_spec("magnitude-global", measure=NO_LATENCY)
    primary = pipeline.run_watch(spec, RunOptions(out=tmp_path))
    assert primary is not None and primary.trackers
    primary.close()

    class OtherRank:
        is_primary = False

    monkeypatch.setattr(pipeline, "current_platform", lambda: OtherRank())
    assert pipeline.run_watch(spec, RunOptions(out=tmp_path)) is None


def test_a_stage_sums_its_samples_as_they_come():
    """Half a million samples (a 290-hour stage at one per 2 s) must not be kept one by one."""
    stage = resources.StageResources()
    for i in range(1000):
        stage.add({"time": i, "cpu_percent": float(i % 10), "rss_mb": 100.0 + i, "shm_mb": None})
    used = stage.as_dict()
    assert used["samples"] == 1000 and used["cpu_percent_mean"] == 4.5 and used["cpu_percent_peak"] == 9.0
    assert used["rss_mb_peak"] == 1099.0 and used["shm_mb_peak"] is None
    assert len(repr(stage)) < 1000


def test_a_failing_tracker_is_dropped_with_a_note_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    import sparsebench.runners.pipeline as pipeline

    class Gone(watch_module.Tracker):
        name = "mlflow"

        def scalars(self, stage, step, values):
            raise ConnectionError("tracking server unreachable")

    real = pipeline.make_trackers
    monkeypatch.setattr(pipeline, "make_trackers", lambda *a, **k: [Gone(), *real(*a, **k)])
    record = execute(tiny_spec("magnitude-global", measure=NO_LATENCY), RunOptions(out=tmp_path))
    assert record.status == "ok"
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("sparsebench: note")]
    assert notes == ["sparsebench: note: mlflow logging stopped (ConnectionError: tracking server unreachable); "
                     "the run goes on"]
    assert scalars(tmp_path, record.run_id, "finetune")["train/loss"]          # TensorBoard went on


class _Recording(watch_module.Tracker):
    name = "recording"

    def __init__(self):
        self.points = []

    def scalars(self, stage, step, values):
        self.points.append((stage, step, values))


def test_each_interval_writes_throughput_and_loader_wait_of_its_own_stage():
    tracker = _Recording()
    watch = watch_module.RunWatch([tracker], torch.device("cpu"), sample_every=0, flush_every=0.0)

    class Dense(_Trainer):
        stage, hooks = "dense", []

    class Method(_Trainer):
        stage, hooks = "method", []

    watch.after_step(Dense(), 64, 0.02, 0.1)
    time.sleep(0.3)                                  # the gap (an evaluation, the next stage's setup)
    watch.after_step(Method(), 32, 0.05, 0.1)
    watch.close()
    [(stage, step, values)] = [p for p in tracker.points if p[0] == "method"]
    assert stage == "method" and step == Method.position
    assert values["train/loader_wait_fraction"] == pytest.approx(0.5)
    assert 5 < values["train/steps_per_second"] <= 10.5          # one 0.1 s step, not the dense stage's gap
    assert values["train/images_per_second"] == pytest.approx(32 * values["train/steps_per_second"])


def test_the_progress_bar_shows_the_last_validation_top1():
    from sparsebench.models import create_model
    from sparsebench.specs import Recipe
    from sparsebench.training.trainer import Trainer

    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))) for _ in range(4)]

    class Bar:
        postfixes = []

        def __init__(self, total, desc):
            pass

        def update(self, n=1):
            pass

        def set_postfix(self, **kwargs):
            Bar.postfixes.append(kwargs)

        def close(self):
            pass

    trainer = Trainer(create_model("resnet20_tiny", img_size=16), batches, Recipe(), torch.device("cpu"), 10, 0.05)
    result = trainer.fit(12, batches, eval_every=5, progress=Bar)
    assert "val" not in Bar.postfixes[0]                                      # step 1: not validated yet
    assert Bar.postfixes[-1]["val"] == f"{100 * result.history[-2]['val_top1']:.2f}%"   # step 11: the one at 10

"""`sweep --rehearse`: every setting of a suite at its real model and resolution on fabricated data at
real image sizes, through every stage, with per-stage figures and a device-hours projection; nothing
reaches a results store."""
import dataclasses
import json
import textwrap

import pytest
from PIL import Image

from sparsebench.cli import main
from sparsebench.datasets.replicas import REAL_IMAGE_SIZES, fabricate
from sparsebench.runners.rehearse import (CPU_DEVICE_BATCH, REHEARSAL_STEPS, ResourceSampler, device_batch_of,
                                          rehearsal_spec, run_rehearsal)
from sparsebench.runners.suite import load_suite

SUITE = """
name: rehearse-test
methods:
  - dense
  - magnitude-global
  - {name: l1-channel, args: {scope: global}}
models: [resnet20]
datasets: [cifar10]
targets: {sparsity: [0.9], flops: [0.5]}
seeds: [0, 1]
recipe: {batch_size: 128, pretrain_epochs: 160, finetune_epochs: 40, search_epochs: 1, precision: bf16}
data: {val_fraction: 0.1, workers: 1}
"""


def write_suite(tmp_path, text=SUITE):
    path = tmp_path / "suite.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_real_size_replicas_are_photo_sized_jpegs(tmp_path):
    fabricate("imagenet", tmp_path, per_class=2, real_size=True)
    files = sorted((tmp_path / "imagenet" / "train").rglob("*.JPEG"))
    assert files and all(Image.open(f).size == REAL_IMAGE_SIZES["imagenet"] for f in files)
    kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    assert 50 < kb < 200          # an ImageNet JPEG is ~110 KB; tiny replicas are well under 1 KB
    fabricate("imagenet", tmp_path / "tiny", per_class=2)
    assert Image.open(next((tmp_path / "tiny" / "imagenet" / "train").rglob("*.JPEG"))).size == (18, 14)


def test_rehearsal_spec_keeps_model_and_resolution_and_scales_the_batch(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    spec = suite.specs[0]
    batch, micro = device_batch_of(spec, None, cuda=False)
    assert (batch, micro) == (CPU_DEVICE_BATCH, None)
    assert device_batch_of(spec, 4, cuda=False) == (4, None)
    assert device_batch_of(spec, None, cuda=True) == (128, None)          # the suite's batch, at once
    assert device_batch_of(spec, 32, cuda=True) == (128, 32)              # or in micro-batches
    with_micro = dataclasses.replace(spec, recipe=dataclasses.replace(spec.recipe, device_batch=64))
    assert device_batch_of(with_micro, None, cuda=True) == (128, 64)
    assert rehearsal_spec(with_micro, 10, 128, 1, cuda=True, micro_batch=64).recipe.device_batch == 64
    small = rehearsal_spec(spec, steps_per_epoch=10, batch=batch, workers=1, cuda=False)
    assert small.model == spec.model and small.data.img_size == spec.data.img_size
    assert small.recipe.batch_size == batch and small.recipe.precision == "fp32"
    assert small.recipe.steps(small.recipe.pretrain_epochs, 10 * batch) == REHEARSAL_STEPS
    assert rehearsal_spec(spec, 10, 128, 1, cuda=True).recipe.precision == "bf16"


def test_every_setting_runs_through_every_stage_with_figures_and_a_projection(tmp_path):
    suite = load_suite(write_suite(tmp_path))
    out = tmp_path / "out"
    report = run_rehearsal(suite, out, say=lambda _: None)
    assert set(report["settings"]) == {"dense resnet20 cifar10", "magnitude-global resnet20 cifar10",
                                       "l1-channel[scope=global] resnet20 cifar10"}
    for label, entry in report["settings"].items():
        assert entry["status"] in ("ok", "missed_target"), (label, entry.get("error"))
        stages = entry["stages"]
        assert {"data", "dense checkpoint", "evaluation", "latency", "record"} <= set(stages)
        assert all(s["peak_pss_mb"] > 50 for s in stages.values())        # torch alone is more
        assert entry["rehearsal_batch"] == CPU_DEVICE_BATCH and entry["batch_scale"] == 128 / CPU_DEVICE_BATCH
        if label.startswith("dense"):
            assert stages["dense checkpoint"]["steps"] >= REHEARSAL_STEPS          # trained here, timed
            assert stages["dense checkpoint"]["step_seconds"] > 0 and entry["pretrain_step_seconds"] > 0
            assert stages["latency"]["seconds"] > 0                              # dense vs itself: realizable
        else:
            assert stages["finetune"]["steps"] >= REHEARSAL_STEPS
            assert entry["scaled_step_seconds"]["finetune"] == pytest.approx(
                stages["finetune"]["step_seconds"] * entry["batch_scale"], rel=1e-2)
        assert entry["saved_model_mb"] and entry["saved_model_mb"] > 0
    loader = report["loaders"]["cifar10@32"]
    assert loader["images_per_s"] > 0 and loader["batch"] == CPU_DEVICE_BATCH
    # the suite's own loaders (batch 128, 1 worker) on this machine's /dev/shm: 2 batches in flight
    if loader.get("shm_size_mb"):
        assert loader["suite_prefetch_factor"] == 2 and loader["suite_shm_in_flight_mb"] > 0
    projection = report["projection"]
    assert projection["runs"] == 6 and not projection["not_projected"]
    # 2 dense checkpoints x 160 epochs of ~352 steps at >= 1 ms a step: hours, not seconds
    assert projection["device_hours"] > 2 * 160 * 350 * 1e-3 / 3600
    assert set(projection["per_method_hours"]) == {"dense", "magnitude-global", "l1-channel[scope=global]"}
    # the figures are on disk; the runs' records, checkpoints and models are not
    assert json.loads((out / "rehearsal.json").read_text())["settings"].keys() == report["settings"].keys()
    assert "Projected" in (out / "rehearsal.md").read_text()
    assert sorted(p.name for p in out.iterdir()) == ["rehearsal.json", "rehearsal.md"]


def test_a_rehearsal_run_again_keeps_its_finished_settings_and_runs_the_failed_ones(tmp_path, monkeypatch):
    from sparsebench.runners import pipeline

    suite = load_suite(write_suite(tmp_path, SUITE.replace("  - {name: l1-channel, args: {scope: global}}\n", "")))
    out = tmp_path / "out"
    real_execute, ran = pipeline.execute, []

    def execute(spec, options, times, fail=True):
        ran.append(spec.method)
        if fail and spec.method == "magnitude-global":
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.")
        return real_execute(spec, options, times)

    monkeypatch.setattr(pipeline, "execute", execute)
    first = run_rehearsal(suite, out, say=lambda _: None)
    assert first["settings"]["magnitude-global resnet20 cifar10"]["status"] == "error"
    ran.clear()
    monkeypatch.setattr(pipeline, "execute", lambda spec, options, times: execute(spec, options, times, fail=False))
    second = run_rehearsal(suite, out, say=lambda _: None)
    assert ran == ["magnitude-global"]                       # only the failed setting ran again
    assert second["settings"]["dense resnet20 cifar10"] == first["settings"]["dense resnet20 cifar10"]
    assert second["settings"]["magnitude-global resnet20 cifar10"]["status"] in ("ok", "missed_target")
    assert not second["projection"]["not_projected"]


def test_a_failing_setting_is_reported_and_the_others_still_run(tmp_path, capsys):
    text = SUITE.replace("  - dense\n", "  - dense\n  - {name: gap-cyclic, args: {num_groups: 2}}\n") \
        .replace("  - magnitude-global\n  - {name: l1-channel, args: {scope: global}}\n", "")
    code = main(["sweep", str(write_suite(tmp_path, text)), "--rehearse", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert code == 1
    assert "REHEARSAL FAILED gap-cyclic[num_groups=2] resnet20 cifar10:" in printed
    report = json.loads((tmp_path / "out" / "rehearsal.json").read_text())
    assert report["settings"]["dense resnet20 cifar10"]["status"] == "ok"


def test_cover_pairs_rehearses_every_pair_once_and_every_dataset_of_a_model(tmp_path):
    from sparsebench.runners.rehearse import rehearsal_settings, setting_label

    text = SUITE.replace("models: [resnet20]", "models: [resnet20, resnet56]") \
        .replace("datasets: [cifar10]", "datasets: [cifar10, cifar100]")
    specs = load_suite(write_suite(tmp_path, text)).specs
    every = rehearsal_settings(specs)
    assert len(every) == 3 * 2 * 2 and len({setting_label(s) for s in every}) == 12
    pairs = rehearsal_settings(specs, "pairs")
    assert sorted((s.method, s.model) for s in pairs) == sorted((m, n) for m in ("dense", "magnitude-global", "l1-channel")
                                                                for n in ("resnet20", "resnet56"))
    for model in ("resnet20", "resnet56"):
        assert {s.dataset for s in pairs if s.model == model} == {"cifar10", "cifar100"}
    with pytest.raises(ValueError, match="allowed: datasets, pairs"):
        rehearsal_settings(specs, "targets")


def test_bad_device_batch_is_one_line(tmp_path, capsys):
    code = main(["sweep", str(write_suite(tmp_path)), "--rehearse", "--device-batch", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--device-batch=0" in err[0]


def test_sampler_sees_a_child_process_and_shared_memory(tmp_path):
    import multiprocessing as mp
    import os

    import numpy as np

    ctx = mp.get_context("fork")
    with ResourceSampler(interval=0.02) as sampler:
        sampler.reset()
        base = sampler.peak_pss
        ready = ctx.Event()
        child = ctx.Process(target=_hold_memory, args=(ready,))
        child.start()
        ready.wait(10)
        shm = None
        if os.path.isdir("/dev/shm"):
            shm = np.memmap("/dev/shm/sparsebench-rehearse-test", dtype=np.uint8, mode="w+", shape=(64 * 2**20,))
            shm[:] = 1
        sampler.sample()
        child.terminate()
        child.join()
        assert sampler.peak_pss - base > 100 * 2**20           # the child's 200 MB
        if shm is not None:
            assert sampler.peak_shm >= 60 * 2**20
            del shm
            os.remove("/dev/shm/sparsebench-rehearse-test")


def _hold_memory(ready):
    import time

    block = bytearray(200 * 2**20)
    block[::4096] = b"x" * len(block[::4096])
    ready.set()
    time.sleep(30)

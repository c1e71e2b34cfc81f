"""DataLoader workers live only while their loader is in use, and their prefetching fits /dev/shm."""
import dataclasses
import logging
import multiprocessing

import pytest
import torch

from sparsebench.datasets import create_dataset
from sparsebench.runners import pipeline
from sparsebench.runners.loaders import SHM_FRACTION, prefetch_plan
from sparsebench.runners.pipeline import RunOptions, execute, make_loaders
from sparsebench.specs import DataSpec, MeasureSpec, SpecError
from sparsebench.training.loading import EVAL_BATCH
from sparsebench.training.trainer import evaluate

from conftest import tiny_spec


def live_workers() -> int:
    """Worker processes this process has started and that still run (DataLoader workers are multiprocessing
    children)."""
    return len(multiprocessing.active_children())


@pytest.fixture(scope="module")
def digits():
    return create_dataset("digits", img_size=16)


def test_only_the_train_loader_in_use_holds_workers(digits):
    before = live_workers()
    loaders = make_loaders(digits, 64, 0, workers=2)
    dense = iter(loaders["train_dense"])
    next(dense)                                       # mid-epoch: its workers hold prefetched batches
    assert live_workers() - before == 2
    evaluate(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(10)), loaders["val"],
             torch.device("cpu"), 10)                 # an evaluation within the fit keeps the fit's workers
    assert live_workers() - before == 4
    method = iter(loaders["train_method"])
    next(method)                                      # a new phase: the dense loader and val gave theirs back
    assert live_workers() - before == 2
    next(method)                                      # the loader in use keeps its workers across batches
    assert live_workers() - before == 2
    list(loaders["test"])                             # one pass: its workers end with it
    assert live_workers() - before == 2
    loaders.release()
    assert live_workers() == before
    assert len(list(loaders["train_method"])) == len(digits.train) // 64    # released loaders still work
    del loaders, dense, method
    assert live_workers() == before                   # a dropped group's workers go with it


def test_a_run_holds_no_loader_workers_after_its_training_stages(tmp_path, monkeypatch):
    """Evaluation and latency timing start with no worker process left from the three fits."""
    seen = {}
    stages = {"evaluation_stage": pipeline.evaluation_stage, "measurement_stage": pipeline.measurement_stage}

    def counting(name):
        def stage(*args, **kwargs):
            seen[name] = live_workers()
            return stages[name](*args, **kwargs)
        return stage

    for name in stages:
        monkeypatch.setattr(pipeline, name, counting(name))
    before = live_workers()
    spec = dataclasses.replace(tiny_spec(measure=MeasureSpec(latency=False)), data=DataSpec(img_size=16, workers=1))
    record = execute(spec, RunOptions(out=tmp_path, resume=False))
    assert record.status in ("ok", "missed_target")
    assert seen == {"evaluation_stage": before, "measurement_stage": before}
    assert live_workers() == before
    loader = record.data["loader"]
    assert loader["workers"] == 1 and loader["prefetch_factor"] == 2 and loader["shm_bytes"]


def test_prefetching_is_bounded_by_shared_memory(digits, caplog):
    image, _ = digits.train[0]
    per_sample = image.element_size() * image.numel() + 8    # the image as the dataset yields it, an int64 label
    batch = per_sample * (64 + EVAL_BATCH)   # one train batch and one evaluation batch live together
    roomy = prefetch_plan(digits.train, 64, EVAL_BATCH, 4, shm_bytes=10 ** 12)
    assert (roomy.prefetch_factor, roomy.batch_bytes, roomy.prefetch_bytes) == (2, batch, 4 * 2 * batch)
    with caplog.at_level(logging.WARNING, logger="sparsebench"):
        tight = prefetch_plan(digits.train, 64, EVAL_BATCH, 4, shm_bytes=2 * 4 * batch + 10)
    assert tight.prefetch_factor == 1 and tight.prefetch_bytes <= tight.budget_bytes
    assert "prefetch_factor lowered to 1" in caplog.text
    with pytest.raises(SpecError) as e:
        prefetch_plan(digits.train, 64, EVAL_BATCH, 4, shm_bytes=4 * batch)
    fitting = int(4 * batch * SHM_FRACTION) // batch                  # workers with one batch each that fit
    assert "\n" not in str(e.value) and f"data.workers <= {fitting}" in str(e.value) and "/dev/shm" in str(e.value)
    two_ranks = prefetch_plan(digits.train, 64, EVAL_BATCH, 4, ranks=2, shm_bytes=10 ** 12)
    assert two_ranks.batch_bytes == per_sample * (32 + EVAL_BATCH)
    # the loaders are built with the plan's prefetch factor
    loaders = make_loaders(digits, 64, 0, workers=2)
    assert loaders.plan.prefetch_factor == loaders["train_dense"].loader.prefetch_factor == loaders["val"].loader.prefetch_factor
    assert loaders["train_dense"].loader.persistent_workers and not loaders["test"].loader.persistent_workers

"""The dense-checkpoint cache trusts only sound files for this run, and never caches a diverged model."""
import io
import logging

import pytest
import torch

from sparsebench.datasets import create_dataset
from sparsebench.errors import Diverged
from sparsebench.models import create_model
from sparsebench.runners.checkpoints import dense_checkpoint, load_dense_weights
from sparsebench.runners.pipeline import make_loaders
from sparsebench.specs import Recipe

from tests.conftest import tiny_spec

STEPS = 2


@pytest.fixture(scope="module")
def loaders():
    data = create_dataset("digits", img_size=16)
    return make_loaders(data, 64, 0)


def _make_model():
    return create_model("resnet20_tiny", num_classes=10, img_size=16)


def _train(spec, cache, loaders):
    return dense_checkpoint(spec, cache, _make_model, loaders, 10, torch.device("cpu"), STEPS, STEPS)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _random_bytes(path):
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())


def _empty(path):
    path.write_bytes(b"")


def _other_key(path):
    blob = torch.load(path, weights_only=True)
    blob["key"] = {**blob["key"], "seed": 12345}
    buffer = io.BytesIO()
    torch.save(blob, buffer)
    path.write_bytes(buffer.getvalue())


def _pickled_object(path):   # loads with weights_only=False only: an arbitrary pickle is refused
    buffer = io.BytesIO()
    torch.save({"meta": logging.getLogger("x"), "state_dict": {}}, buffer)
    path.write_bytes(buffer.getvalue())


@pytest.mark.parametrize("damage", [_truncate, _random_bytes, _empty, _other_key, _pickled_object])
def test_a_bad_cache_file_is_moved_aside_with_one_warning_and_retrained(tmp_path, loaders, caplog, damage):
    spec = tiny_spec()
    first = _train(spec, tmp_path, loaders)
    damage(first.path)
    damaged = first.path.read_bytes()
    with caplog.at_level(logging.WARNING, logger="sparsebench"):
        again = _train(spec, tmp_path, loaders)
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert str(first.path) in warnings[0].getMessage()
    aside = list(tmp_path.glob(first.path.name + ".bad-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == damaged
    assert again.path == first.path and again.steps == STEPS and first.path.read_bytes() != damaged   # retrained
    model = load_dense_weights(_make_model(), again)
    assert all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point())
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sparsebench"):
        _train(spec, tmp_path, loaders)                      # a sound file is simply reused
    assert not caplog.records


def test_a_sound_cache_file_is_reused_without_training(tmp_path, loaders, monkeypatch):
    spec = tiny_spec()
    first = _train(spec, tmp_path, loaders)
    import sparsebench.runners.checkpoints as ck

    monkeypatch.setattr(ck, "Trainer", None)     # training again would fail
    assert _train(spec, tmp_path, loaders) == first


def test_a_diverged_dense_model_is_never_cached(tmp_path, loaders):
    spec = tiny_spec(recipe=Recipe(batch_size=64, lr=1e6, momentum=0.99, warmup_fraction=0.0,
                                   pretrain_epochs=1, finetune_epochs=1, search_epochs=0.5))
    with pytest.raises(Diverged, match="diverged in dense: "):   # the trainer stops at the first NaN loss
        dense_checkpoint(spec, tmp_path, _make_model, loaders, 10, torch.device("cpu"), 5, 5)
    assert not list(tmp_path.glob("*.pt"))
    assert issubclass(Diverged, RuntimeError)

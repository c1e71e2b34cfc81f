"""Image files that fail to decode are found before training, on replicas in the real on-disk formats."""
import json

import pytest
from torch.utils.data import DataLoader

from sparsebench.cli import main
from sparsebench.datasets import DatasetCorruptError, create_dataset
from sparsebench.datasets.integrity import files_of, scan, screen

from tests.datasets import replicas

MAKERS = {
    "imagenet": lambda root: replicas.make_imagenet(root, n_train=4, n_val=2),          # ImageFolder .samples
    "tiny-imagenet": lambda root: replicas.make_tiny_imagenet(root),                     # our ImageList .samples
    "food101": lambda root: replicas.make_food101(root, n_train=4, n_test=2),           # torchvision _image_files
    "pets": lambda root: replicas.make_pets(root),                                       # torchvision _images
}


def _break(splits):
    """Truncate one JPEG and replace another by text: both keep their image names."""
    files = files_of(splits)
    truncated, text = files[1], files[-1]
    data = open(truncated, "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    open(text, "w").write("<html>404 not found</html>")
    return {truncated, text}


@pytest.fixture
def broken(tmp_path, monkeypatch, request):
    replicas.allow_partial(monkeypatch)
    name = request.param
    MAKERS[name](tmp_path)
    splits = create_dataset(name, data_root=str(tmp_path), img_size=16, val_fraction=0.25)
    return name, tmp_path, splits, _break(splits)


@pytest.mark.parametrize("broken", list(MAKERS), indirect=True)
def test_scan_finds_exactly_the_bad_files(broken):
    name, root, splits, bad = broken
    checked, found = scan(splits)
    assert checked == len(files_of(splits)) and checked > len(bad)
    assert {b.path for b in found} == bad
    assert all("\n" not in b.error for b in found)


@pytest.mark.parametrize("broken", ["imagenet"], indirect=True)
def test_without_screening_training_would_die_midway_and_screening_removes_the_bad(broken):
    name, root, splits, bad = broken
    with pytest.raises(Exception):          # what a DataLoader hits hours into training
        for ds in (splits.train, splits.val, splits.test):
            list(DataLoader(ds, batch_size=4))
    with pytest.raises(DatasetCorruptError) as e:
        screen(splits, max_bad=1)
    assert "\n" not in str(e.value) and "2 image file(s) fail to decode" in str(e.value)
    assert "check-data imagenet" in str(e.value) and "--max-bad-samples" in str(e.value)
    kept = screen(splits, max_bad=2)
    assert kept.split["bad_samples_skipped"] == 2 and kept.split["max_bad_samples"] == 2
    n = sum(kept.split[k] for k in ("n_train", "n_val", "n_test"))
    assert n == sum(splits.split[k] for k in ("n_train", "n_val", "n_test")) - 2
    for ds in (kept.train, kept.val, kept.test):
        assert sum(len(y) for _, y in DataLoader(ds, batch_size=4)) == len(ds)


@pytest.mark.parametrize("broken", ["food101"], indirect=True)
def test_check_data_lists_the_bad_files_and_exits_1(broken, capsys):
    name, root, splits, bad = broken
    code = main(["check-data", name, "--data-root", str(root), "--img-size", "16", "--quiet"])
    out = capsys.readouterr().out
    assert code == 1
    listed = {line.split(" ", 1)[1].rsplit(": ", 2)[0] for line in out.splitlines() if line.startswith("bad ")}
    assert listed == bad and f"{len(bad)} bad" in out


def test_check_data_on_sound_data(tmp_path, monkeypatch, capsys):
    replicas.allow_partial(monkeypatch)
    replicas.make_imagenet(tmp_path)
    assert main(["check-data", "imagenet", "--data-root", str(tmp_path), "--quiet"]) == 0
    assert "0 bad" in capsys.readouterr().out
    assert main(["check-data", "digits"]) == 0
    assert "nothing to check" in capsys.readouterr().out


@pytest.mark.parametrize("broken", ["imagenet"], indirect=True)
def test_a_run_refuses_bad_data_before_training_or_skips_and_records(broken, tmp_path, capsys):
    name, root, splits, bad = broken
    argv = ["run", "--method", "magnitude-global", "--model", "resnet20_tiny", "--dataset", name, "--target",
            "sparsity=0.5", "--data-root", str(root), "--img-size", "16", "--quiet", "--no-latency", "--val-fraction",
            "0.25", "--recipe", "batch_size=2", "--recipe", "pretrain_epochs=0.5", "--recipe", "finetune_epochs=0.5",
            "--recipe", "search_epochs=0.5"]
    out = tmp_path / "out"
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fail to decode" in err
    assert not (out / "checkpoints").exists() and not (out / "records").exists()    # before any training
    code = main([*argv, "--out", str(out), "--max-bad-samples", "2"])
    assert code == 0, capsys.readouterr().err
    (record,) = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert record["data"]["bad_samples_skipped"] == 2 and record["data"]["max_bad_samples"] == 2

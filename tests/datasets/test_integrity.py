"""Image files that fail to decode are found before training, on replicas in the real on-disk formats;
checks that scale: metadata and a stratified decoded sample by default, every file with --full, the
verdict cached in the data folder by listing."""
import json
import os

import pytest
from torch.utils.data import DataLoader

from sparsebench.cli import main
from sparsebench.datasets import DatasetCorruptError, create_dataset
from sparsebench.datasets import integrity
from sparsebench.datasets.integrity import CACHE_FOLDER, SAMPLE_PER_CLASS, files_of, scan, screen, stratified_sample

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
    check = scan(splits, full=True)
    assert check.files == check.decoded == len(files_of(splits)) and check.files > len(bad)
    assert {b.path for b in check.bad} == bad
    assert all("\n" not in b.error for b in check.bad)


@pytest.mark.parametrize("broken", ["imagenet"], indirect=True)
def test_without_screening_training_would_die_midway_and_screening_removes_the_bad(broken):
    name, root, splits, bad = broken
    with pytest.raises(Exception):          # what a DataLoader hits hours into training
        for ds in (splits.train, splits.val, splits.test):
            list(DataLoader(ds, batch_size=4))
    scan(splits, full=True)                 # `check-data --full`: its verdict is cached for the runs
    with pytest.raises(DatasetCorruptError) as e:
        screen(splits, max_bad=1)
    assert "\n" not in str(e.value) and "2 image file(s) fail to decode" in str(e.value)
    assert "check-data imagenet --full" in str(e.value) and "--max-bad-samples" in str(e.value)
    kept = screen(splits, max_bad=2)
    assert kept.split["bad_samples_skipped"] == 2 and kept.split["max_bad_samples"] == 2
    n = sum(kept.split[k] for k in ("n_train", "n_val", "n_test"))
    assert n == sum(splits.split[k] for k in ("n_train", "n_val", "n_test")) - 2
    for ds in (kept.train, kept.val, kept.test):
        assert sum(len(y) for _, y in DataLoader(ds, batch_size=4)) == len(ds)


@pytest.mark.parametrize("broken", ["food101"], indirect=True)
def test_check_data_lists_the_bad_files_and_exits_1(broken, capsys):
    name, root, splits, bad = broken
    code = main(["check-data", name, "--data-root", str(root), "--img-size", "16", "--quiet", "--full"])
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
    assert main(["check-data", name, "--data-root", str(root), "--quiet", "--full"]) == 1
    capsys.readouterr()
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "fail to decode" in err
    assert not (out / "checkpoints").exists() and not (out / "records").exists()    # before any training
    code = main([*argv, "--out", str(out), "--max-bad-samples", "2"])
    assert code == 0, capsys.readouterr().err
    (record,) = [json.loads(p.read_text()) for p in (out / "records").glob("*.json")]
    assert record["data"]["bad_samples_skipped"] == 2 and record["data"]["max_bad_samples"] == 2


# --- checks that scale --------------------------------------------------------------------------
@pytest.fixture
def decodes(monkeypatch):
    """The files `integrity.decode` opened, in order."""
    opened = []
    real = integrity.decode

    def counting(path):
        opened.append(path)
        return real(path)

    monkeypatch.setattr(integrity, "decode", counting)
    return opened


@pytest.fixture
def imagenet(tmp_path, monkeypatch):
    """An ImageNet-layout replica: 3 classes of 8 train and 4 val (the official test split) images."""
    replicas.allow_partial(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    replicas.make_imagenet(tmp_path / "data", n_train=8, n_val=4)
    return tmp_path / "data"


def load(root, val_fraction=0.25):
    return create_dataset("imagenet", data_root=str(root), img_size=16, val_fraction=val_fraction)


def test_the_default_check_decodes_a_stratified_sample_and_full_decodes_every_file(imagenet, decodes):
    splits = load(imagenet)
    check = scan(splits)
    assert check.files == 36 and not check.full and not check.bad
    # SAMPLE_PER_CLASS files of each class of the official train split and of the official test split
    assert len(decodes) == check.decoded == 2 * 3 * SAMPLE_PER_CLASS < check.files
    per_group = {}
    for path in decodes:
        group = (path.split(os.sep)[-3], path.split(os.sep)[-2])          # (train|val folder, class)
        per_group[group] = per_group.get(group, 0) + 1
    assert len(per_group) == 6 and set(per_group.values()) == {SAMPLE_PER_CLASS}
    assert check.files_per_class == {**{f"train/{c}": 8 for c in range(3)}, **{f"test/{c}": 4 for c in range(3)}}
    # seeded and independent of the validation carving: the same files for every run
    assert stratified_sample(load(imagenet, val_fraction=0.5)) == stratified_sample(splits) == decodes
    decodes.clear()
    full = scan(splits, full=True)
    assert full.full and full.decoded == len(decodes) == 36


def test_the_verdict_is_cached_in_the_data_folder_until_the_listing_changes(imagenet, decodes, tmp_path):
    first = scan(load(imagenet))
    assert first.cache_path == imagenet / CACHE_FOLDER / "imagenet.json" and not first.cached
    decodes.clear()
    # another run or a sweep with another --out: another carving, the same listing, nothing decoded
    for splits in (load(imagenet), load(imagenet, val_fraction=0.5)):
        again = scan(splits)
        assert again.cached and again.decoded == first.decoded and decodes == []
    kept = screen(load(imagenet), max_bad=0)
    assert decodes == [] and kept.split["files_checked"] == {"files": 36, "decoded": 18, "decode": "stratified sample"}
    # a file added: the listing changed, the files are checked again
    replicas.write_image(imagenet / "imagenet" / "train" / replicas.IMAGENET_WNIDS[0] / "extra.JPEG", (18, 14))
    changed = scan(load(imagenet))
    assert not changed.cached and changed.files == 37 and len(decodes) == changed.decoded > 0
    decodes.clear()
    # a file renamed: the same count, another listing
    folder = imagenet / "imagenet" / "val" / replicas.IMAGENET_WNIDS[1]
    first_file = sorted(folder.iterdir())[0]
    first_file.rename(folder / ("renamed-" + first_file.name))
    renamed = scan(load(imagenet))
    assert not renamed.cached and renamed.files == 37 and decodes


def test_full_finds_a_corrupt_file_the_sample_leaves_out_and_runs_then_use_its_verdict(imagenet, decodes, capsys):
    splits = load(imagenet)
    outside = sorted(set(files_of(splits)) - set(stratified_sample(splits)))[0]
    open(outside, "wb").write(b"<html>404 not found</html>")
    assert not scan(splits).bad                                   # metadata fine, not in the sample
    argv = ["check-data", "imagenet", "--data-root", str(imagenet), "--quiet"]
    assert main(argv) == 0 and "cached verdict" in capsys.readouterr().out
    assert main([*argv, "--full"]) == 1
    out = capsys.readouterr().out
    assert f"bad {outside}: " in out and "every file decoded, 1 bad" in out
    decodes.clear()
    with pytest.raises(DatasetCorruptError):
        screen(load(imagenet), max_bad=0)                         # the full verdict, cached: no decode
    assert decodes == []
    assert main([*argv, "--full"]) == 1 and len(decodes) == 36    # --full decodes again whatever is cached


@pytest.mark.parametrize("name", list(MAKERS))
def test_every_on_disk_format_reuses_its_cached_verdict(name, tmp_path, monkeypatch, decodes):
    """Class folders (ImageNet, Tiny-ImageNet, Food-101) and one flat image folder (Pets): writing the
    verdict changes no folder the key reads."""
    replicas.allow_partial(monkeypatch)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    MAKERS[name](tmp_path)
    first = scan(create_dataset(name, data_root=str(tmp_path), img_size=16, val_fraction=0.25))
    assert first.decoded == len(decodes) > 0 and first.cache_path.parent.name == CACHE_FOLDER
    assert first.cache_path.is_relative_to(tmp_path) and not first.cache_path.is_relative_to(tmp_path / "user-cache")
    decodes.clear()
    again = scan(create_dataset(name, data_root=str(tmp_path), img_size=16, val_fraction=0.25))
    assert again.cached and decodes == [] and again.bad == first.bad == []


def test_an_empty_file_is_found_by_metadata_without_decoding_it(imagenet, decodes):
    splits = load(imagenet)
    outside = sorted(set(files_of(splits)) - set(stratified_sample(splits)))[-1]
    open(outside, "wb").close()
    check = scan(splits)
    assert [(b.path, b.error) for b in check.bad] == [(outside, "empty file (0 bytes)")] and outside not in decodes


def test_a_read_only_data_folder_keeps_the_verdict_in_the_user_cache(imagenet, decodes, tmp_path):
    (imagenet / CACHE_FOLDER).write_text("a file where the cache folder would go")
    first = scan(load(imagenet))
    assert first.cache_path is not None and first.cache_path.is_relative_to(tmp_path / "user-cache")
    decodes.clear()
    assert scan(load(imagenet)).cached and decodes == []


def test_a_second_sweep_into_another_out_decodes_nothing(imagenet, decodes, tmp_path):
    """The sweep's pre-flight check and its runs find the verdict in the data root, whatever --out."""
    import dataclasses

    from sparsebench.cli.runs import _check_data
    from sparsebench.runners.pipeline import RunOptions, data_stage
    from sparsebench.specs import DataSpec

    from conftest import tiny_spec

    spec = tiny_spec()
    spec = dataclasses.replace(spec, dataset="imagenet", data=DataSpec(img_size=16, val_fraction=0.25),
                               recipe=dataclasses.replace(spec.recipe, batch_size=4))
    _check_data([spec], RunOptions(out=tmp_path / "first", data_root=str(imagenet)))
    assert len(decodes) == 2 * 3 * SAMPLE_PER_CLASS
    decodes.clear()
    _check_data([spec], RunOptions(out=tmp_path / "second", data_root=str(imagenet)))
    data = data_stage(spec, RunOptions(out=tmp_path / "second", data_root=str(imagenet)))
    assert decodes == [] and data.split["files_checked"]["files"] == 36
    assert not (tmp_path / "first" / "data-checks").exists()        # nothing kept per results folder

"""Check a dataset's image files before training, so a bad file is found in minutes, not hours.

Load-time checks (`_checks.py`) see that listed files exist; they do not decode them. A truncated
JPEG or a non-image file with an image name only fails when a DataLoader reaches it, maybe hours
into training. `scan` checks the files of the train (and validation) and test splits:

- by default, metadata for every file (it exists, it is not empty; files per class counted) and a
  decode of a stratified sample: `SAMPLE_PER_CLASS` files of every class of every official split,
  chosen with a fixed seed (ImageNet: 6,000 decodes, seconds, instead of 1.33 M, an hour);
- with `full=True` (`sparsebench check-data DATASET --full`), a decode of every file.

The verdict is cached in the data root, beside the folder holding the files (ImageNet:
`<data root>/.sparsebench-checks/imagenet.json`; where that cannot be written, under the user cache,
`$XDG_CACHE_HOME/sparsebench/data-checks`), keyed by the listing: the
files' relative paths and the modification times of the folders that hold them, so finding it
stats a few thousand folders, not every file. Every run, and every sweep whatever its `--out`,
reuses it; a file added, removed or renamed changes the key. A file rewritten in place under the
same name is not seen by the key: `check-data --full` decodes everything again whatever is cached.
A full verdict serves the default check too.

`screen` applies the run's policy: no bad file allowed (the default), or bad samples skipped
and counted up to a limit, with the count stored in the split facts (and so in the record).
Datasets held in memory (digits, CIFAR arrays) have no files to check; they pass as they are.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from torch.utils.data import Dataset, Subset

from sparsebench.datasets.base import DatasetCorruptError, DatasetSplits


@dataclass(frozen=True)
class BadSample:
    path: str
    error: str


def sample_paths(dataset: Dataset) -> Optional[List[str]]:
    """The image file of every sample of a dataset view, or None for in-memory data."""
    base = getattr(dataset, "base", dataset)          # a `Transformed` view: the files are in its base
    samples = getattr(base, "samples", None)          # ImageFolder, our ImageList: (path, label)
    if samples is not None:
        return [str(s[0]) for s in samples]
    for attr in ("_image_files", "_images"):          # torchvision Food101, Flowers102 / OxfordIIITPet
        files = getattr(base, attr, None)
        if files is not None:
            return [str(f) for f in files]
    return None


def _views(splits: DatasetSplits) -> Dict[str, Tuple[Dataset, Sequence[int]]]:
    out = {}
    for name in ("train", "val", "test"):
        ds = getattr(splits, name)
        if isinstance(ds, Subset):
            out[name] = (ds.dataset, list(ds.indices))
        else:
            out[name] = (ds, range(len(ds)))
    return out


def decode(path: str) -> Optional[str]:
    """None if the file decodes as an image, else the one-line reason."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
        return None
    except Exception as e:  # noqa: BLE001 -- every way a file can fail to decode is a bad sample
        return " ".join(f"{type(e).__name__}: {e}".split())


def files_of(splits: DatasetSplits) -> List[str]:
    """Every image file the splits read, once each, in a stable order."""
    seen = {}
    for base, indices in _views(splits).values():
        paths = sample_paths(base)
        if paths is not None:
            for i in indices:
                seen.setdefault(paths[i], None)
    return list(seen)


SAMPLE_PER_CLASS = 3            # files decoded per class and official split by the default check
SAMPLE_SEED = 0
CHECK_VERSION = 1               # in the cache key: a change of what a check does invalidates old verdicts
CACHE_FOLDER = ".sparsebench-checks"


@dataclass
class DataCheck:
    """What a check found: `files` checked by metadata, `decoded` of them decoded, the bad ones."""
    files: int
    decoded: int
    bad: List[BadSample]
    full: bool                              # every file decoded (else a stratified sample)
    files_per_class: Dict[str, int] = field(default_factory=dict)   # "<split>/<label>": files
    cached: bool = False                    # the verdict came from the cache: nothing decoded now
    cache_path: Optional[Path] = None       # where the verdict is cached (None: nowhere writable)


def sample_labels(dataset: Dataset) -> Optional[List[int]]:
    """The class of every sample of an on-disk dataset view (ImageFolder, ImageList, torchvision's
    transfer sets), or None where the dataset does not list them."""
    base = getattr(dataset, "base", dataset)
    samples = getattr(base, "samples", None)
    if samples is not None:
        return [int(s[1]) for s in samples]
    labels = getattr(base, "_labels", None)
    return [int(label) for label in labels] if labels is not None else None


def _official_splits(splits: DatasetSplits) -> List[Tuple[str, List[str], Optional[List[int]]]]:
    """(name, files, labels) of each distinct on-disk dataset the splits read: the official train split
    (which the validation split is carved from) and the official test split."""
    out, seen = [], set()
    for name, (base, indices) in _views(splits).items():
        paths = sample_paths(base)
        root = getattr(base, "base", base)
        if paths is None or id(root) in seen:
            continue
        seen.add(id(root))
        if name == "val":
            name = "train"
        out.append((name, paths, sample_labels(base)))
    return out


def stratified_sample(splits: DatasetSplits, per_class: int = SAMPLE_PER_CLASS, seed: int = SAMPLE_SEED) -> List[str]:
    """`per_class` files of every class of every official split, chosen by a seeded generator from the
    sorted files of each class: the same files for the same listing, whatever the validation carving."""
    rng = random.Random(seed)
    chosen = {}
    for _, paths, labels in _official_splits(splits):
        by_class: Dict[int, List[str]] = {}
        for i, path in enumerate(paths):
            by_class.setdefault(labels[i] if labels is not None else 0, []).append(path)
        for label in sorted(by_class):
            files = sorted(by_class[label])
            k = per_class if labels is not None else per_class * 8        # no classes listed: a few more
            for path in rng.sample(files, min(k, len(files))):
                chosen.setdefault(path, None)
    return list(chosen)


def files_per_class(splits: DatasetSplits) -> Dict[str, int]:
    """Files of each class of each official split, as `"<split>/<label>"`."""
    counts: Dict[str, int] = {}
    for name, paths, labels in _official_splits(splits):
        for label in labels if labels is not None else [0] * len(paths):
            key = f"{name}/{label}"
            counts[key] = counts.get(key, 0) + 1
    return counts


def metadata_problem(path: str) -> Optional[str]:
    """None if the file exists and is not empty, else the one-line reason (no byte of it is read)."""
    try:
        st = os.stat(path)
    except OSError as e:
        return " ".join(f"{type(e).__name__}: {e.strerror or e}".split())
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def scan(splits: DatasetSplits, progress: Optional[Callable] = None, full: bool = False,
         name: Optional[str] = None, use_cache: bool = True) -> DataCheck:
    """Check the files of `splits`: metadata for all and a decode of the stratified sample, or with
    `full` a decode of all. A cached verdict for the same listing is returned as it is, except that
    `full` always decodes (it is what finds a file rewritten in place). `progress` is a tqdm-like
    factory(total, desc); `name` names the dataset in its bars (the cache goes by the dataset's own name,
    so that `check-data`'s verdict is the one the runs find)."""
    dataset = splits.info.name
    name = name or dataset
    files = files_of(splits)
    if not files:
        return DataCheck(0, 0, [], full)
    base = _data_folder(files)
    key = listing_key(dataset, base, files)
    if use_cache and not full:
        cached = _read_cache(base, dataset, key)
        if cached is not None:
            return cached
    bad: Dict[str, str] = {}
    for path in _bar(files, progress, f"check {name} (metadata)"):
        reason = metadata_problem(path)
        if reason:
            bad[path] = reason
    to_decode = [f for f in (files if full else stratified_sample(splits)) if f not in bad]
    for path in _bar(to_decode, progress, f"check {name} ({'every file' if full else 'sample'})"):
        reason = decode(path)
        if reason:
            bad[path] = reason
    check = DataCheck(len(files), len(to_decode), [BadSample(p, bad[p]) for p in files if p in bad], full,
                      files_per_class(splits))
    if use_cache:
        check.cache_path = _write_cache(base, dataset, key, check)
    return check


def _bar(items: List[str], progress: Optional[Callable], desc: str):
    bar = progress(len(items), desc) if progress and items else None
    for item in items:
        yield item
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()


def _data_folder(files: List[str]) -> Path:
    """The deepest folder holding every file: the dataset's own folder under the data root."""
    folders = {f.rpartition(os.sep)[0] or "." for f in files}          # a few thousand, made absolute once each
    return Path(os.path.commonpath([os.path.abspath(folder) for folder in folders]))


def listing_key(name: str, base: Path, files: List[str]) -> str:
    """The cache key of a listing: the files' paths relative to `base` and the modification times of
    the folders holding them (a file added, removed or renamed changes its folder's). Stats the
    folders only, never each file."""
    digest = hashlib.sha256(f"{CHECK_VERSION}\0{name}\0".encode())
    folders = set()
    prefix = str(base) + os.sep
    relative = [f[len(prefix):] if f.startswith(prefix) else os.path.relpath(os.path.abspath(f), base) for f in files]
    for f in sorted(relative):
        digest.update(f.encode("utf-8", "surrogateescape") + b"\0")
        folders.add(os.path.dirname(f))
    for folder in sorted(folders):
        try:
            mtime = os.stat(base / folder).st_mtime_ns
        except OSError:
            mtime = -1
        digest.update(f"{folder}\0{mtime}\0".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def user_cache_dir() -> Path:
    """Where verdicts go when the data folder cannot be written: `$XDG_CACHE_HOME` or ~/.cache."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sparsebench" / "data-checks"


def _cache_files(base: Path, name: str) -> List[Path]:
    """The verdict file of dataset `name` beside the folder holding its files (never inside it: writing
    there would change a keyed folder's modification time where the images lie directly in `base`, as
    Pets' and Flowers' do), then in the user cache (named by the folder)."""
    from sparsebench.specs import stable_hash

    return [base.parent / CACHE_FOLDER / f"{name}.json",
            user_cache_dir() / f"{name}-{stable_hash(str(base))[:16]}.json"]


def _read_cache(base: Path, name: str, key: str) -> Optional[DataCheck]:
    for path in _cache_files(base, name):
        try:
            data = json.loads(path.read_text())
            if data["key"] != key:
                continue
            return DataCheck(data["files"], data["decoded"], [BadSample(**b) for b in data["bad"]], data["full"],
                             data["files_per_class"], cached=True, cache_path=path)
        except (OSError, ValueError, KeyError, TypeError):
            continue                                   # absent or unreadable: the next place, or a new check
    return None


def _write_cache(base: Path, name: str, key: str, check: DataCheck) -> Optional[Path]:
    """Write the verdict to the first place that takes it; None (the check is simply redone next
    time) where none does."""
    from sparsebench.platform import atomic_write_bytes

    text = json.dumps({"key": key, "files": check.files, "decoded": check.decoded, "full": check.full,
                       "bad": [b.__dict__ for b in check.bad], "files_per_class": check.files_per_class})
    for path in _cache_files(base, name):
        try:
            atomic_write_bytes(path, text.encode())
            return path
        except OSError:
            continue                                   # read-only data root, no home: try the next place
    return None


def screen(splits: DatasetSplits, max_bad: int, progress: Optional[Callable] = None) -> DatasetSplits:
    """The splits with the bad files a check found removed (`scan`: metadata and a decoded sample, or
    the cached verdict, a full one where `check-data --full` ran), if there are at most `max_bad`.

    More than `max_bad` bad files is a `DatasetCorruptError` naming the first one. The numbers
    skipped per split, the limit and how the files were checked are added to `split` (stored in
    every record).
    """
    name = splits.info.name
    check = scan(splits, progress, name=name)
    bad = check.bad
    split = {**splits.split, "max_bad_samples": max_bad}
    if check.files:
        split["files_checked"] = {"files": check.files, "decoded": check.decoded,
                                  "decode": "every file" if check.full else "stratified sample"}
    if len(bad) > max_bad:
        first = bad[0]
        raise DatasetCorruptError(
            f"{name}: {len(bad)} image file(s) fail to decode, first {first.path} ({first.error}); "
            f"list them with `sparsebench check-data {name} --full`, replace them, or allow skipping them with "
            f"--max-bad-samples N (N >= {len(bad)}; recorded with the run)")
    if not bad:
        return DatasetSplits(splits.train, splits.val, splits.test, splits.info, {**split, "bad_samples_skipped": 0})
    bad_paths = {b.path for b in bad}
    views = _views(splits)
    kept = {}
    for part, (base, indices) in views.items():
        paths = sample_paths(base)
        good = [i for i in indices if paths is None or paths[i] not in bad_paths]
        kept[part] = (Subset(base, good), len(indices) - len(good))
    split.update({"n_train": len(kept["train"][0]), "n_val": len(kept["val"][0]), "n_test": len(kept["test"][0]),
                  "bad_samples_skipped": sum(n for _, n in kept.values()),
                  "bad_samples_skipped_per_split": {part: n for part, (_, n) in kept.items()}})
    return DatasetSplits(kept["train"][0], kept["val"][0], kept["test"][0], splits.info, split)

"""Decode every image file of a dataset before training, so a bad file is found in minutes, not hours.

Load-time checks (`_checks.py`) see that listed files exist; they do not decode them. A truncated
JPEG or a non-image file with an image name only fails when a DataLoader reaches it, maybe hours
into training. `scan` decodes every file of the train (and validation) and test splits;
`screen` applies the run's policy: no bad file allowed (the default), or bad samples skipped
and counted up to a limit, with the count stored in the split facts (and so in the record).

Datasets held in memory (digits, CIFAR arrays) have no files to decode; they pass as they are.
A scan is cached by the names, sizes and modification times of the files, so a sweep decodes
a dataset once.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
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


def scan(splits: DatasetSplits, progress: Optional[Callable] = None, cache_dir: Optional[Path] = None,
         name: str = "dataset") -> Tuple[int, List[BadSample]]:
    """(files decoded, bad files). `progress` is a tqdm-like factory(total, desc)."""
    files = files_of(splits)
    if not files:
        return 0, []
    cache = _cache_path(cache_dir, name, files) if cache_dir else None
    if cache is not None and cache.is_file():
        try:
            return len(files), [BadSample(**b) for b in json.loads(cache.read_text())["bad"]]
        except (ValueError, KeyError, TypeError):
            pass                                       # an unreadable cache is simply redone
    bar = progress(len(files), f"check {name}") if progress else None
    bad = []
    for path in files:
        reason = decode(path)
        if reason:
            bad.append(BadSample(path, reason))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if cache is not None:
        from sparsebench.store.records import atomic_write_text

        atomic_write_text(cache, json.dumps({"files": len(files), "bad": [b.__dict__ for b in bad]}))
    return len(files), bad


def _cache_path(cache_dir: Path, name: str, files: List[str]) -> Path:
    from sparsebench.specs import stable_hash

    stamp = []
    for f in files:
        try:
            st = os.stat(f)
            stamp.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            stamp.append((f, None, None))
    return Path(cache_dir) / f"{name}-{stable_hash(stamp)[:16]}.json"


def screen(splits: DatasetSplits, max_bad: int, progress: Optional[Callable] = None,
           cache_dir: Optional[Path] = None) -> DatasetSplits:
    """The splits with files that fail to decode removed, if there are at most `max_bad` of them.

    More than `max_bad` bad files is a `DatasetCorruptError` naming the first one. The numbers
    skipped per split and the limit are added to `split` (stored in every record).
    """
    name = splits.info.name
    _, bad = scan(splits, progress, cache_dir, name)
    split = {**splits.split, "max_bad_samples": max_bad}
    if len(bad) > max_bad:
        first = bad[0]
        raise DatasetCorruptError(
            f"{name}: {len(bad)} image file(s) fail to decode, first {first.path} ({first.error}); "
            f"list them with `sparsebench check-data {name}`, replace them, or allow skipping them with "
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

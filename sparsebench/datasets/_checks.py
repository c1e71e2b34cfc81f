"""Shared load-time checks for the on-disk datasets: one-line errors, raised at creation time.

Every loader does cheap structural checks before it hands anything to a DataLoader: the
expected folder exists (else `DatasetNotFoundError`, naming the folder and how to fetch the
data), metadata files are present and parseable, every image listed in the metadata exists
on disk, labels are in range, and the sample / class counts equal the official sizes (else
`DatasetCorruptError`). Image bytes are not decoded at load time.

Partial copies
--------------
The official-size checks (`expected counts`) can be relaxed by setting the environment
variable ``SPARSEBENCH_ALLOW_PARTIAL_DATA=1``: a smaller copy of a dataset (a subset of the
classes or images, e.g. the small fabricated replicas used by the tests) is then accepted
and the number of classes is taken from the data's own metadata. Everything else stays
checked: an inconsistent copy (a file listed in the metadata but missing on disk, an
unparseable pickle or annotation file, a label out of range) still raises
`DatasetCorruptError`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Optional, Set, TypeVar

from sparsebench.datasets.base import DATA_ENV, DatasetCorruptError, DatasetNotFoundError

PARTIAL_ENV = "SPARSEBENCH_ALLOW_PARTIAL_DATA"
_TRUE = {"1", "true", "yes", "on"}

T = TypeVar("T")


def partial_data_allowed() -> bool:
    """True when ``SPARSEBENCH_ALLOW_PARTIAL_DATA`` is set to 1/true/yes/on."""
    return os.environ.get(PARTIAL_ENV, "").strip().lower() in _TRUE


def one_line(text: object) -> str:
    """Collapse whitespace (newlines included) so that an error message stays on one line."""
    return " ".join(str(text).split())


def download_hint(name: str) -> str:
    return (
        f"pass --download (sparsebench run or sweep) to fetch {name} into the data root, "
        f"or set {DATA_ENV}=/path to a data root that already holds it"
    )


def not_found(name: str, where: Path, root: Path, how: Optional[str] = None) -> DatasetNotFoundError:
    """The one-line 'missing data' error: dataset, directory looked in, and how to fetch it."""
    how = how or download_hint(name)
    return DatasetNotFoundError(one_line(f"{name}: dataset not found: looked for {where} (data root {root}); {how}"))


# How to replace a corrupt copy, per dataset; datasets without an automatic download set theirs.
_REFETCH_HINTS = {}


def set_refetch_hint(name: str, hint: str) -> None:
    """Override the 'fetch it again' advice of the corrupt-data errors for dataset `name`."""
    _REFETCH_HINTS[name] = hint


def refetch_hint(name: str, where: Path) -> str:
    return _REFETCH_HINTS.get(name, f"delete {where} and fetch it again with --download")


def corrupt(name: str, where: Path, problem: str) -> DatasetCorruptError:
    """The one-line 'corrupt or incomplete data' error."""
    return DatasetCorruptError(
        one_line(f"{name}: corrupt or incomplete data in {where}: {problem}; {refetch_hint(name, where)}")
    )


def require_files(name: str, base: Path, *relative: str) -> None:
    """Every listed path (file or folder) must exist under `base`."""
    for rel in relative:
        if not (base / rel).exists():
            raise corrupt(name, base, f"missing {rel}")


def check_count(name: str, base: Path, what: str, actual: int, expected: int) -> None:
    """`actual` must equal the official `expected` size unless partial data is allowed."""
    if actual == expected or partial_data_allowed():
        return
    raise DatasetCorruptError(
        one_line(
            f"{name}: {what} is {actual} but the official dataset has {expected} (in {base}); "
            f"the copy is incomplete or corrupt: {refetch_hint(name, base)}, or set "
            f"{PARTIAL_ENV}=1 to accept a partial copy on purpose"
        )
    )


def check_listed_exist(name: str, base: Path, listed: Iterable[str], present: Set[str], folder: str) -> None:
    """Every name in `listed` must be in `present` (the listing of `folder`), else corrupt."""
    missing = [x for x in listed if x not in present]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise corrupt(name, base, f"{folder}{missing[0]} is listed in the metadata but missing on disk{more}")


def listdir(path: Path) -> Set[str]:
    """Names in a directory (empty set when it does not exist)."""
    try:
        with os.scandir(path) as it:
            return {e.name for e in it}
    except (FileNotFoundError, NotADirectoryError):
        return set()


def guarded(name: str, where: Path, what: str, fn: Callable[[], T]) -> T:
    """Run `fn` (e.g. a torchvision constructor); any failure becomes a DatasetCorruptError."""
    try:
        return fn()
    except (DatasetCorruptError, DatasetNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001 -- turned into one clear line at creation time
        raise corrupt(name, where, f"{what} failed: {type(exc).__name__}: {exc}") from exc


def guarded_download(name: str, where: Path, url: str, fn: Callable[[], T]) -> T:
    """Run a download; a failure (no network, bad checksum) becomes a DatasetNotFoundError."""
    try:
        return fn()
    except (DatasetCorruptError, DatasetNotFoundError):
        raise
    except Exception as exc:  # noqa: BLE001
        raise DatasetNotFoundError(
            one_line(
                f"{name}: download from {url} into {where} failed ({type(exc).__name__}: {exc}); "
                f"fetch it by hand and extract it there, or set {DATA_ENV}=/path to a data root that holds it"
            )
        ) from exc

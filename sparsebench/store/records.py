"""Run records: one JSON file per (run, seed), named by the spec hash, written atomically.

Layout under a results directory:
    records/<run_id>.json        one finished run (never partial: temp file + rename)
    checkpoints/dense-*.pt       the dense checkpoint cache (unless a shared cache is given)

A record that exists is a finished run: re-running the same spec skips it; several
workers or machines writing into one directory never duplicate a run, because the
record name is the spec's hash and the rename is atomic. Under torch.distributed only the
primary process writes (`sparsebench.platform`).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Dict, List, Tuple

# the file primitives live in the platform layer; re-exported here for their many readers
from sparsebench.platform import atomic_write_bytes, current_umask, file_lock  # noqa: F401
from sparsebench.platform import current as current_platform
from sparsebench.store.record import SCHEMA_VERSION, RecordError, RunRecord

log = logging.getLogger("sparsebench")


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class RecordStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.records_dir = self.root / "records"

    def path(self, run_id: str) -> Path:
        return self.records_dir / f"{run_id}.json"

    def exists(self, run_id: str) -> bool:
        return self.path(run_id).exists()

    def write(self, record: RunRecord) -> Path:
        """Atomically, by the primary process only (the other ranks of a DDP run write nothing)."""
        path = self.path(record.run_id)
        current_platform().write_text(path, record.to_json())
        return path

    def lock(self, run_id: str):
        """A non-blocking lock on one run (`with store.lock(id) as mine:`); False while another
        process runs it, so two overlapping sweeps never run it twice."""
        return file_lock(self.lock_path(run_id), blocking=False)

    def lock_path(self, run_id: str) -> Path:
        """The run's lock file, which records its holder (`platform.lock_holder`)."""
        return self.records_dir / ".locks" / f"{run_id}.lock"

    def read(self, run_id: str) -> RunRecord:
        """One record; RecordError (one line) when the file is not a readable record."""
        return _read(self.path(run_id))

    def load_all(self) -> List[RunRecord]:
        """Every readable record. Each entry that is not one (empty, not JSON, another schema,
        a missing field, a directory) is skipped with one warning line naming it, so one bad
        file never hides the rest of a results directory."""
        if not self.records_dir.exists():
            return []
        found = []
        for p in sorted(self.records_dir.glob("*.json")):
            try:
                found.append((p, _read(p)))
            except RecordError as e:
                log.warning("sparsebench: warning: skipped %s: %s", p, e)
        return _one_per_run(found)


def _one_per_run(found: List[Tuple[Path, RunRecord]]) -> List[RunRecord]:
    """A run is its spec hash, never its file name: copies of one run (results folders merged
    from two machines, a renamed file) count once. The newest finished record is kept (a run
    with a result or a divergence over a failed one, then the later `created`), with one
    warning line per copy left out, naming both files."""
    by_run: Dict[str, Tuple[Path, RunRecord]] = {}
    order: List[str] = []
    for path, record in found:
        key = record.spec_hash
        if key not in by_run:
            by_run[key] = (path, record)
            order.append(key)
            continue
        kept_path, kept = by_run[key]
        if _rank(record) > _rank(kept):
            by_run[key] = (path, record)
            kept_path, path = path, kept_path
        log.warning("sparsebench: warning: %s is another record of run %s (spec %s…) in %s; counted once, "
                    "keeping %s", path.name, record.run_id, key[:12], path.parent, kept_path.name)
    return [by_run[k][1] for k in order]


def _rank(record: RunRecord):
    return (record.status != "failed", record.created)


def _read(path: Path) -> RunRecord:
    if path.is_dir():
        raise RecordError("a directory, not a record file")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RecordError(f"unreadable ({type(e).__name__})") from None
    if not text.strip():
        raise RecordError("empty file")
    return RunRecord.from_json(text)


def load_records(results_dir: Path) -> List[RunRecord]:
    """All records of a results directory (the one holding `records/`)."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"results directory {str(results_dir)!r} does not exist")
    return RecordStore(results_dir).load_all()

"""The results store: atomic, hash-named JSON run records, typed as `RunRecord`."""
from sparsebench.store.record import (
    SCHEMA_VERSION, STATUSES, Mechanism, PerSample, RecordError, RunRecord, Tolerance, target_check,
)
from sparsebench.store.records import RecordStore, atomic_write_bytes, atomic_write_text, file_lock, load_records

__all__ = ["SCHEMA_VERSION", "STATUSES", "Mechanism", "PerSample", "RecordError", "RecordStore", "RunRecord", "Tolerance", "atomic_write_bytes",
           "atomic_write_text", "file_lock", "load_records", "target_check"]

"""The results store: atomic, hash-named JSON run records."""
from sparsebench.store.records import SCHEMA_VERSION, RecordStore, atomic_write_bytes, atomic_write_text, file_lock, load_records

__all__ = ["SCHEMA_VERSION", "RecordStore", "atomic_write_bytes", "atomic_write_text", "file_lock", "load_records"]

"""One small registry used by models, datasets and methods alike (timm style).

A registry maps a name to a constructor plus a one-line description. Third-party code
adds entries through a decorator, or through a package entry-point group that is loaded
lazily the first time the registry is read.
"""
from __future__ import annotations

import dataclasses
import hashlib
import inspect
import logging
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Dict, Iterator, List, Optional

log = logging.getLogger("sparsebench")


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists the allowed names."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    tags: tuple = ()
    # Where a plugin entry came from: distribution, version and the SHA-256 of the source of
    # the module defining it. None for entries registered by sparsebench itself or in-process.
    origin: Optional[Dict[str, str]] = None


class Registry:
    def __init__(self, kind: str, entry_point_group: Optional[str] = None):
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: Dict[str, Entry] = {}
        self._entry_points_loaded = entry_point_group is None

    def register(self, name: str, description: str = "", tags: tuple = ()):
        """Decorator: register `factory` under `name`."""

        def decorator(factory):
            if name in self._entries and self._entries[name].factory is not factory:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            first_doc_line = ((factory.__doc__ or "").strip().splitlines() or [""])[0]
            self._entries[name] = Entry(name, factory, description or first_doc_line, tuple(tags))
            return factory

        return decorator

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in metadata.entry_points(group=self.entry_point_group):
            before = set(self._entries)
            # Loading the module runs its @register decorators; an entry point may also
            # point straight at a class or factory, which we register under its name.
            try:
                obj = ep.load()
                if ep.name not in self._entries and callable(obj):
                    self.register(ep.name)(obj)
            except Exception as e:  # noqa: BLE001 — one broken plugin must not take the others down
                reason = (str(e).splitlines() or [""])[0]
                log.warning("sparsebench: warning: %s plugin %r (%s) failed to import and is skipped: %s%s",
                            self.kind, ep.name, ep.value, type(e).__name__, f": {reason}" if reason else "")
                for name in set(self._entries) - before:     # nothing half-registered stays
                    del self._entries[name]
                continue
            dist = getattr(ep, "dist", None)
            for name in set(self._entries) - before:
                entry = self._entries[name]
                origin = {"distribution": dist.name if dist else None, "version": dist.version if dist else None,
                          "entry_point": ep.name, "source_sha256": source_sha256(entry.factory)}
                self._entries[name] = dataclasses.replace(entry, origin=origin)

    def get(self, name: str) -> Entry:
        self._load_entry_points()
        if name not in self._entries:
            allowed = ", ".join(sorted(self._entries))
            raise UnknownNameError(f"unknown {self.kind} {name!r}; allowed: {allowed}")
        return self._entries[name]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries

    def names(self) -> List[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self._entries[n] for n in self.names())


def source_sha256(obj: Any) -> Optional[str]:
    """SHA-256 of the source file of the module defining `obj`: editing a plugin changes it."""
    try:
        path = inspect.getsourcefile(obj)
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except (TypeError, OSError):
        return None

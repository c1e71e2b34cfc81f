"""One small registry used by models, datasets and methods alike (timm style).

A registry maps a name to a constructor plus a one-line description. Third-party code
adds entries through a decorator, or through a package entry-point group that is loaded
lazily the first time the registry is read.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata
from typing import Any, Callable, Dict, Iterator, List, Optional


class UnknownNameError(ValueError):
    """A name that is not in a registry; the message lists the allowed names."""


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    description: str
    tags: tuple = ()


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
            # Loading the module runs its @register decorators; an entry point may also
            # point straight at a class or factory, which we register under its name.
            obj = ep.load()
            if ep.name not in self._entries and callable(obj):
                self.register(ep.name)(obj)

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

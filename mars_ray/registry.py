"""A typed, loud registry: one per family of pluggable parts (policies, workloads, ...)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mars_ray.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries.

    Registering a name twice raises; looking up an unknown name raises
    :class:`UnknownNameError` listing the known names. A name of the form
    ``package.module:attr`` is an escape hatch for out-of-tree entries: it is
    imported instead of looked up.
    """

    def __init__(self, kind: str) -> None:
        self._kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@REGISTRY.register("name")``."""

        def decorate(entry: T) -> T:
            self.add(name, entry)
            return entry

        return decorate

    def add(self, name: str, entry: T) -> None:
        if name in self._entries:
            raise ValueError(f"{self._kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        if name in self._entries:
            return self._entries[name]
        if ":" in name:
            return self._import(name)
        known = ", ".join(sorted(self._entries))
        raise UnknownNameError(f"unknown {self._kind} {name!r}; known: {known}")

    def _import(self, path: str) -> T:
        module_name, _, attr = path.partition(":")
        try:
            entry: T = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UnknownNameError(f"cannot import {self._kind} {path!r}: {exc}") from exc
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

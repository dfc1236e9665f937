"""One small name -> factory registry, used by backbones, heads and data generators.

Families register themselves with a decorator in their own file (``@register_head("mlp3")``);
the family package's ``__init__`` imports every family file. The registry imports that package
only when a name is first looked up, so importing ftpipe stays cheap and has no side effects.
"""

from __future__ import annotations

import importlib
from typing import Callable, Generic, TypeVar

from pipeline.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, package: str) -> None:
        self.kind = kind
        self._package = package
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(factory: T) -> T:
            if name in self._entries and self._entries[name] is not factory:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = factory
            return factory

        return decorate

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            importlib.import_module(self._package)

    def get(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; available: {', '.join(self.names()) or '(none)'}"
            ) from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


BACKBONES: Registry = Registry("backbone", "pipeline.backbones")
HEADS: Registry = Registry("head", "pipeline.heads")
GENERATORS: Registry = Registry("data generator", "pipeline.data.generators")

register_head = HEADS.register
register_generator = GENERATORS.register

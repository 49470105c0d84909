"""The one registry type behind every extension point (sources, metrics, writers, selection
strategies): name → what was registered, in registration order. A name is registered once — a
plug-in cannot silently replace a built-in (``unregister`` it first); an unknown name is a
ConfigError that lists the registered ones."""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(dict, Generic[T]):
    def __init__(self, what: str, unknown: Callable[[str, list[str]], str] | None = None):
        super().__init__()
        self.what = what
        self._unknown = unknown or (lambda name, names: f"unknown {what} {name!r}; available: {', '.join(names)}")

    def add(self, name: str, obj: T) -> T:
        if name in self:
            raise ValueError(f"{self.what} {name!r} is registered already (unregister it first to replace it)")
        self[name] = obj
        return obj

    def remove(self, name: str) -> None:
        self.pop(name, None)

    def names(self) -> list[str]:
        return list(self)

    def lookup(self, name: str) -> T:
        if not isinstance(name, str) or name not in self:
            raise ConfigError(self._unknown(name, self.names()))
        return self[name]

"""A named registry of a method's parts (transforms, token weightings): one entry per name, looked up
with an error that lists what is registered."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        self.entries[name] = entry
        return entry

    def get(self, name: str) -> T:
        if name not in self.entries:
            raise KeyError(f"no {self.kind} {name!r}; registered: {sorted(self.entries)}")
        return self.entries[name]

    def __contains__(self, name: object) -> bool:
        return name in self.entries

"""A tiny name → implementation registry shared by every extension axis."""

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from wdmoe.errors import UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps registered names to factories; ``get`` raises a clear error for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            assert name not in self._items, f"{self.kind} {name!r} registered twice"
            self._items[name] = item
            return item

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UnknownNameError(self.kind, name, list(self._items))
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

"""What the next forwards of a model are, told to whoever accounts them (the simulator, the BS).

A scorer that runs a context once and scores several continuations on its KV cache says so with
:func:`sharing_contexts` around its two forwards; a forward listener reads
:func:`shared_contexts` to tell the requests apart. A server batching several users' requests
(:mod:`wdmoe.serving`) says which request each row is with :func:`serving_rows`. ContextVars, so
that an annotation belongs to the thread (or task) that runs the forwards and is gone when the
block exits, also on error.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SharedContexts:
    """The next two forwards of the model score requests that share contexts: a context pass
    (input_ids [C, S], use_cache=True, no cache given) and then a continuation pass on the cache
    expanded to R rows, where continuation row r continues context row parents[r]. Each
    (context + continuation) is one request the user would send."""

    parents: tuple[int, ...]


_CURRENT: ContextVar[SharedContexts | None] = ContextVar("wdmoe_shared_contexts", default=None)


def shared_contexts() -> SharedContexts | None:
    """The current annotation; None outside :func:`sharing_contexts`."""
    return _CURRENT.get()


@contextmanager
def sharing_contexts(parents: Sequence[int]) -> Iterator[SharedContexts]:
    """Annotate the (context pass, continuation pass) run inside; row r of the continuation pass
    continues context row ``parents[r]``."""
    annotation = SharedContexts(tuple(int(p) for p in parents))
    assert annotation.parents and min(annotation.parents) >= 0, f"bad parents {annotation.parents}"
    token = _CURRENT.set(annotation)
    try:
        yield annotation
    finally:
        _CURRENT.reset(token)


@dataclass(frozen=True)
class ConcurrentRows:
    """The next forward serves concurrent requests together (continuous batching,
    :mod:`wdmoe.serving`): row r belongs to the request ``tags[r]`` (whatever its accountant keeps
    per request) and had ``context[r]`` tokens cached before this forward. Every row's tokens are
    real (no padding among the new tokens): a prefill runs alone, a decode step has one token per
    row."""

    tags: tuple[Any, ...]
    context: tuple[int, ...]

    @property
    def rows(self) -> int:
        return len(self.tags)


_ROWS: ContextVar[ConcurrentRows | None] = ContextVar("wdmoe_concurrent_rows", default=None)


def concurrent_rows() -> ConcurrentRows | None:
    """The current annotation; None outside :func:`serving_rows`."""
    return _ROWS.get()


@contextmanager
def serving_rows(tags: Sequence[Any], context: Sequence[int]) -> Iterator[ConcurrentRows]:
    """Annotate the forward run inside as serving the requests ``tags`` (one row each)."""
    annotation = ConcurrentRows(tuple(tags), tuple(int(c) for c in context))
    assert annotation.rows == len(annotation.context) > 0, "one context length per row"
    token = _ROWS.set(annotation)
    try:
        yield annotation
    finally:
        _ROWS.reset(token)

"""What the next forwards of a model are, told to whoever accounts them (the simulator).

A scorer that runs a context once and scores several continuations on its KV cache says so with
:func:`sharing_contexts` around its two forwards; a forward listener reads
:func:`shared_contexts` to tell the requests apart. A ContextVar, so that the annotation belongs
to the thread (or task) that runs the forwards and is gone when the block exits, also on error.
"""

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass


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

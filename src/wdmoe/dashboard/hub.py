"""The dashboard's event hub: events in from any thread, out to each viewer, all bounded.

A publisher (the BS's serving thread, the simulator, a replay) calls :meth:`Hub.publish`, which
only appends a reference to a few deques under one short lock: it never serialises, never waits
for a viewer and never blocks a forward. Each viewer (one server-sent-events stream) owns a
bounded queue; a viewer that falls behind loses its oldest events (counted in ``lost``), never
the publisher's time. The hub keeps the last ``history`` events, so a page opened late sees the
recent past. Memory is bounded: history + clients × per-client events, whatever the run length.

Coalescing: :meth:`Viewer.take` hands the viewer everything pending, keeping only the newest
``step`` (a step carries the cell's state and running totals, so an older one adds nothing the
page would still show) while every other event (text pieces, requests, devices) passes.
"""

import itertools
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Event = tuple[str, dict[str, Any]]  # (kind, values): values are never changed after publishing
HISTORY = 256  # events a new viewer is shown first
PER_VIEWER = 1024  # events a viewer may fall behind before it loses the oldest
MAX_VIEWERS = 8  # server-sent-events streams at once (each holds one server thread)
COALESCED = frozenset({"step"})  # kinds of which a viewer gets only the newest pending one


@dataclass
class Viewer:
    """One viewer's bounded queue (see the module doc); ``lost``: events dropped for falling behind."""

    queue: deque[Event] = field(default_factory=lambda: deque(maxlen=PER_VIEWER))
    ready: threading.Condition = field(default_factory=threading.Condition)
    lost: int = 0
    closed: bool = False

    def put(self, event: Event) -> None:
        with self.ready:
            if len(self.queue) == self.queue.maxlen:
                self.lost += 1
            self.queue.append(event)
            self.ready.notify()

    def take(self, timeout_s: float) -> list[Event]:
        """Pending events (waiting up to ``timeout_s`` for one), only the newest of each coalesced kind."""
        with self.ready:
            if not self.queue and not self.closed:
                self.ready.wait(timeout_s)
            events, self.queue = list(self.queue), deque(maxlen=self.queue.maxlen)
        newest = {kind: i for i, (kind, _) in enumerate(events) if kind in COALESCED}
        return [e for i, e in enumerate(events) if e[0] not in COALESCED or newest[e[0]] == i]

    def close(self) -> None:
        with self.ready:
            self.closed = True
            self.ready.notify_all()


class Hub:
    """Fan-out of events to viewers (see the module doc). ``hello``: the events a new viewer gets
    first (the cell's layout, the controls), computed when it connects."""

    def __init__(self, hello: Callable[[], list[Event]] | None = None, history: int = HISTORY) -> None:
        self.hello = hello or (lambda: [])
        self.history: deque[Event] = deque(maxlen=history)
        self.viewers: dict[int, Viewer] = {}
        self.ids = itertools.count()
        self.lock = threading.Lock()
        self.published = 0

    def publish(self, kind: str, values: dict[str, Any]) -> None:
        """Hand ``(kind, values)`` to every viewer (from any thread; never blocks on a viewer)."""
        event = (kind, values)
        with self.lock:
            self.published += 1
            self.history.append(event)
            viewers = list(self.viewers.values())
        for viewer in viewers:
            viewer.put(event)

    def subscriber(self, kind: str, values: dict[str, Any]) -> None:
        """:meth:`publish` in the shape of a :class:`~wdmoe.runtime.books.Books` subscriber."""
        self.publish(kind, values)

    def join(self) -> tuple[int, Viewer] | None:
        """A new viewer, primed with hello and the history; None when ``MAX_VIEWERS`` are watching."""
        viewer = Viewer()
        for event in self.hello():
            viewer.put(event)
        with self.lock:
            if len(self.viewers) >= MAX_VIEWERS:
                return None
            for event in self.history:
                viewer.put(event)
            key = next(self.ids)
            self.viewers[key] = viewer
        return key, viewer

    def leave(self, key: int) -> None:
        with self.lock:
            viewer = self.viewers.pop(key, None)
        if viewer is not None:
            viewer.close()

    def close(self) -> None:
        """End every viewer's stream."""
        with self.lock:
            viewers, self.viewers = list(self.viewers.values()), {}
        for viewer in viewers:
            viewer.close()

"""The BS's books: what each device slot and each request did, and the metrics log (no maths).

:class:`Books` is written by the dispatcher after every layer (calls, answers, failures by code,
experts skipped because their device was down or benched, fallbacks, bytes, compute and latency
predicted against measured) and by the BS after every request; :meth:`Books.summary` is what the
``Stats`` RPC serves and the log's last line. Thread-safe.

Every event is also handed to the subscribers (:meth:`Books.subscribe`: the dashboard's hub and
the Prometheus metrics), in the thread that raised it, so they must be quick and never block;
:meth:`Books.notify` reaches the subscribers only (the streamed text of users' answers is not
written to the log). With a subscriber or a log the BS also raises one ``step`` event per forward
(:mod:`~wdmoe.runtime.pulse`), from the per-layer scratch kept in :attr:`Books.pulse`.
"""

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wdmoe.latency import DeviceTimes
from wdmoe.runtime.pulse import Pulse

log = logging.getLogger("wdmoe.bs")
Subscriber = Callable[[str, dict[str, Any]], None]  # (kind, values): called in the event's thread
QUIET = frozenset({"step"})  # kinds logged at DEBUG (one per forward), not INFO


@dataclass
class DeviceStats:
    """What one device slot did: expert calls, failures by code, skipped experts, bytes, times (wall s)."""

    calls: int = 0
    answered: int = 0
    fallbacks: int = 0
    skipped: int = 0  # experts not sent: the device was down or benched and no replica could serve
    probes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    bytes_dl: int = 0
    bytes_ul: int = 0
    compute_s: float = 0.0
    measured_s: float = 0.0
    predicted_s: float = 0.0
    predicted_dl_s: float = 0.0
    predicted_compute_s: float = 0.0
    predicted_ul_s: float = 0.0

    def row(self) -> dict[str, Any]:
        d = asdict(self)
        d["failures"] = dict(self.failures)
        d["mean_compute_ms"] = 1e3 * self.compute_s / self.answered if self.answered else 0.0
        return d

    def add_prediction(self, times: DeviceTimes, u: int, measured_s: float) -> None:
        """Slot u's predicted DL/compute/UL for one layer (``times`` [U]) and the layer's measured s."""
        self.predicted_s += float(times.total_s[u])
        self.predicted_dl_s += float(times.downlink_s[u])
        self.predicted_compute_s += float(times.compute_s[u])
        self.predicted_ul_s += float(times.uplink_s[u])
        self.measured_s += measured_s


@dataclass
class RequestStats:
    """One user request: tokens, timing, the latency model's prediction against measurement."""

    id: int
    max_new_tokens: int = 0
    prompt_tokens: int = 0
    new_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    wall_s: float = 0.0
    context_tokens: int = 0
    forwards: list[dict[str, float]] = field(default_factory=list)  # per forward: measured/predicted
    expert_calls: int = 0
    dropped: int = 0
    fallbacks: int = 0
    bytes_dl: int = 0
    bytes_ul: int = 0

    def summary(self) -> dict[str, Any]:
        decode = self.forwards[1:]
        mean = lambda key, rows: float(np.mean([r[key] for r in rows])) if rows else 0.0  # noqa: E731
        return {
            "id": self.id,
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "ttft_s": self.first_token_s,
            "wall_s": self.wall_s,
            "forwards": len(self.forwards),
            "prefill_measured_s": self.forwards[0]["measured_s"] if self.forwards else 0.0,
            "prefill_predicted_s": self.forwards[0]["predicted_s"] if self.forwards else 0.0,
            "token_measured_s": mean("measured_s", decode),
            "token_predicted_s": mean("predicted_s", decode),
            "expert_calls": self.expert_calls,
            "dropped": self.dropped,
            "drop_rate": self.dropped / self.expert_calls if self.expert_calls else 0.0,
            "fallbacks": self.fallbacks,
            "bytes_dl": self.bytes_dl,
            "bytes_ul": self.bytes_ul,
        }


class Books:
    """Per-slot statistics, overall counters and the JSON-lines metrics log of one BS."""

    def __init__(self, num_slots: int, metrics_log: Path | None = None) -> None:
        self.stats: dict[int, DeviceStats] = {u: DeviceStats() for u in range(num_slots)}
        self.dropped = self.fallbacks = 0  # experts the model went without / ran at the BS
        self.served = Counter[str]()  # requests answered; sums of their per-token latencies (s)
        self.lock = threading.Lock()
        self.log_lock = threading.Lock()
        self.log_file = open(metrics_log, "a", buffering=1) if metrics_log else None  # noqa: SIM115
        self.subscribers: tuple[Subscriber, ...] = ()  # replaced whole, so readers need no lock
        self.pulse = Pulse(num_slots)

    @property
    def listening(self) -> bool:
        """Someone reads the events (a subscriber or the metrics log): worth building a step event."""
        return bool(self.subscribers) or self.log_file is not None

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """Call ``subscriber(kind, values)`` on every event from now on; returns the unsubscribe."""
        with self.log_lock:
            self.subscribers = (*self.subscribers, subscriber)

        def unsubscribe() -> None:
            with self.log_lock:
                self.subscribers = tuple(s for s in self.subscribers if s is not subscriber)

        return unsubscribe

    def event(self, kind: str, **values: Any) -> None:
        """One line of the metrics log (JSON) and the Python log, and every subscriber (any thread)."""
        (log.debug if kind in QUIET else log.info)("%s %s", kind, values)
        if self.log_file is not None:
            line = json.dumps({"event": kind, "time_s": time.time()} | values, default=str) + "\n"
            with self.log_lock:
                if self.log_file is not None:
                    self.log_file.write(line)
        self.notify(kind, values)

    def notify(self, kind: str, values: dict[str, Any]) -> None:
        """``values`` to the subscribers only (not the log); a failing subscriber is logged, never raised."""
        for subscriber in self.subscribers:
            try:
                subscriber(kind, values)
            except Exception:  # a dashboard's bug must not end a forward
                log.exception("event subscriber %r failed on %s", subscriber, kind)

    def tee_text(self, request: int, on_text: Callable[[str], None]) -> Callable[[str], None]:
        """``on_text`` that also tells the subscribers each piece of request ``request``'s answer."""

        def tee(piece: str) -> None:
            on_text(piece)
            if piece and self.subscribers:
                self.notify("text", {"id": request, "text": piece})

        return tee

    def count_failed(self, slots: list[int], fallback: bool) -> None:
        """Experts without a device answer (their slots, −1 for none): run at the BS (fallback) or
        dropped, in the BS's and the devices' books (called once per layer, in order)."""
        if self.listening:
            self.pulse.failed_layer(0 if fallback else len(slots))
        if not slots:
            return
        with self.lock:
            if fallback:
                self.fallbacks += len(slots)
                for u in slots:
                    if u >= 0:
                        self.stats[u].fallbacks += 1
            else:
                self.dropped += len(slots)

    def charge_failed(self, requests: list[RequestStats], fallback: bool) -> None:
        """One expert without a device answer in the books of the requests it had tokens of."""
        with self.lock:
            for request in requests:
                if fallback:
                    request.fallbacks += 1
                else:
                    request.dropped += 1

    def served_request(self, summary: dict[str, Any]) -> None:
        if self.subscribers and "text" in summary:
            self.notify("answer", {"id": summary["id"], "text": summary["text"]})
        with self.lock:
            self.served.update(
                requests=1,
                token_measured_s=summary["token_measured_s"],
                token_predicted_s=summary["token_predicted_s"],
            )
        self.event("request", **{k: v for k, v in summary.items() if k != "text"})

    def probed(self, slot: int) -> None:
        with self.lock:
            self.stats[slot].probes += 1

    def summary(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Per-device rows (their slot's books joined to ``rows``: slot, address, state) and totals."""
        with self.lock:
            devices = [row | self.stats[row["slot"]].row() for row in rows]
            served = self.served.copy()
            dropped, fallbacks = self.dropped, self.fallbacks
        n = served["requests"]
        return {
            "devices": devices,
            "requests": n,
            "totals": {
                "expert_calls": sum(d["calls"] for d in devices),
                "failed_calls": sum(sum(d["failures"].values()) for d in devices),
                "skipped": sum(d["skipped"] for d in devices),
                "dropped": dropped,
                "fallbacks": fallbacks,
                "bytes_dl": sum(d["bytes_dl"] for d in devices),
                "bytes_ul": sum(d["bytes_ul"] for d in devices),
                "mean_token_measured_s": served["token_measured_s"] / n if n else 0.0,
                "mean_token_predicted_s": served["token_predicted_s"] / n if n else 0.0,
            },
        }

    def close(self) -> None:
        with self.log_lock:
            if self.log_file is not None:
                self.log_file.close()
                self.log_file = None

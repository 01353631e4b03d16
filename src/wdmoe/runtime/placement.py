"""Which device serves which expert: the registry of live devices and the replica choice.

Devices register (and re-register every heartbeat) with their cell position ``slot`` — the index
of their channel in the scenario — their address, their data plane's address (none for a static
entry or an older device: those are called over gRPC) and the (layer, expert) pairs they host. A device
is *usable* while its heartbeats arrive (a static entry, added without heartbeats, always is) and
it has not failed since its last heartbeat; a static entry that failed is tried again after
``retry_s``. Several devices may host the same expert (replicas): ``choose`` takes the usable host
whose channel gives one token the shortest time. No maths here: the per-slot times come from the
latency view.

Liveness has two sources: heartbeats, and the device's answers (an answered call counts as one).
A device whose heartbeats lapse (3 periods) is ``expire``d: down until it registers again. A
device that keeps failing its calls (``bench_after`` in a row, typically deadline misses) is
*benched*: unusable for a back-off (``bench_s``, doubling on each bench in a row up to
``bench_max_s``) so that no request waits out its deadlines; after the back-off the BS probes it
(``due_probes``) and ``probe_result`` readmits it or benches it again.

Each device also carries ô, the running estimate of what its messages take beyond their price
(the software's own cost, :mod:`wdmoe.latency.overhead`): kept here, measured by the links.
"""

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from wdmoe.errors import WdmoeError
from wdmoe.latency.overhead import running_estimate_s
from wdmoe.types import ExpertKey


class PlacementError(WdmoeError, ValueError):
    """A registration that does not fit the model or the cell."""


@dataclass
class DeviceEntry:
    slot: int
    address: str
    experts: frozenset[ExpertKey]
    name: str
    last_seen: float
    static: bool = False
    down_since: float | None = None
    registrations: int = 1
    strikes: int = 0  # calls failed in a row
    benches: int = 0  # benches in a row (reset by an answered call)
    benched_until: float | None = None  # benched: not used; probed once this time has passed
    probing: bool = False
    data_address: str = ""  # where its data plane listens; "": call it over gRPC
    overhead_s: float | None = None  # ô: its messages' running cost beyond their price (s of the cell)

    @property
    def benched(self) -> bool:
        return self.benched_until is not None

    def state(self, usable: bool) -> str:
        """up, down, benched or probing (for tables and the Stats RPC)."""
        if self.benched:
            return "probing" if self.probing else "benched"
        return "up" if usable else "down"


@dataclass
class DeviceRegistry:
    """The devices of the cell, by slot. Thread-safe; ``clock`` is injectable for tests."""

    num_slots: int
    layers: tuple[int, ...]  # the model's MoE layer ids (decoder layer indices)
    num_experts: int
    heartbeat_s: float = 1.0
    retry_s: float = 1.0
    bench_after: int = 3
    bench_s: float = 5.0
    bench_max_s: float = 60.0
    clock: Callable[[], float] = time.monotonic
    devices: dict[int, DeviceEntry] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lock = threading.Lock()
        self.version = 0  # bumped by every change that can change who is usable (see epoch)
        self.kept_slots: tuple[Any, tuple[int, int | None], tuple[int, ...]] | None = None  # expert_slots'
        self.kept_hosts: tuple[int, dict[tuple[int | None, int], list[DeviceEntry]]] | None = None

    def changed(self) -> None:
        """Under the lock: something changed who is usable."""
        self.version += 1

    def epoch(self) -> tuple[int, float]:
        """(version, until): who is usable stays the same while the version does and the clock is
        before ``until`` (the first lapse of a heartbeat, or a static entry's retry, to come). What
        is derived from it (the policy's placement) may be kept that long."""
        with self.lock:
            until = math.inf
            for d in self.devices.values():
                if d.benched:
                    continue
                if d.down_since is None and not d.static:
                    until = min(until, d.last_seen + 3 * self.heartbeat_s)
                elif d.down_since is not None and d.static:
                    until = min(until, d.down_since + self.retry_s)
            return self.version, until

    def register(
        self,
        slot: int,
        address: str,
        experts: Iterable[ExpertKey],
        name: str = "",
        static: bool = False,
        data_address: str = "",
    ) -> tuple[DeviceEntry, bool]:
        """Add or refresh a device; returns (entry, came_up): came_up when it is new, moved (either
        address), or back after a failure (the caller then reconnects afresh)."""
        keys = frozenset(experts)
        if not 0 <= slot < self.num_slots:
            raise PlacementError(f"slot {slot} is outside the cell's devices 0..{self.num_slots - 1}")
        bad = sorted(k for k in keys if not (k[0] in self.layers and 0 <= k[1] < self.num_experts))
        if bad:
            raise PlacementError(
                f"experts {bad[:5]} are not in this model (MoE layers {self.layers[0]}..{self.layers[-1]} "
                f"× {self.num_experts} experts)"
            )
        now = self.clock()
        with self.lock:
            old = self.devices.get(slot)
            where = (address, data_address, keys)
            if old is not None and (old.address, old.data_address, old.experts) == where:
                came_up = old.down_since is not None or now - old.last_seen > 3 * self.heartbeat_s
                old.last_seen, old.down_since, old.name = now, None, name
                if came_up:  # back from down (a restart, say): a fresh start, not on the bench
                    old.strikes = old.benches = 0
                    old.benched_until, old.probing = None, False
                old.registrations += 1
                if came_up:
                    self.changed()
                return old, came_up
            entry = DeviceEntry(slot, address, keys, name, now, static, data_address=data_address)
            self.devices[slot] = entry
            self.changed()
            return entry, True

    def usable(self, entry: DeviceEntry, now: float | None = None) -> bool:
        now = self.clock() if now is None else now
        if entry.benched:
            return False
        if entry.down_since is not None:
            return entry.static and now - entry.down_since >= self.retry_s
        return entry.static or now - entry.last_seen <= 3 * self.heartbeat_s

    def mark_down(self, address: str) -> bool:
        """A device that could not be reached; returns whether it was usable until now."""
        now = self.clock()
        with self.lock:
            for entry in self.devices.values():
                if entry.address == address and entry.down_since is None:
                    entry.down_since = now
                    self.changed()
                    return True
        return False

    def expire(self) -> list[DeviceEntry]:
        """Devices (not static) whose heartbeats lapsed since the last look: now marked down."""
        now = self.clock()
        gone = []
        with self.lock:
            for entry in self.devices.values():
                late = now - entry.last_seen > 3 * self.heartbeat_s
                if not entry.static and entry.down_since is None and late:
                    entry.down_since = now
                    gone.append(entry)
            if gone:
                self.changed()
        return gone

    def record(self, slot: int, answered: bool) -> bool:
        """The outcome of one call to device ``slot``; returns whether it benched the device now."""
        now = self.clock()
        with self.lock:
            entry = self.devices.get(slot)
            if entry is None:
                return False
            if answered:
                entry.strikes = entry.benches = 0
                entry.last_seen = max(entry.last_seen, now)
                return False
            entry.strikes += 1
            if entry.benched or entry.strikes < self.bench_after:
                return False
            self._bench(entry, now)
            return True

    def _bench(self, entry: DeviceEntry, now: float) -> None:
        self.changed()
        entry.benches += 1
        entry.benched_until = now + self.backoff_s(entry)
        entry.probing = False

    def backoff_s(self, entry: DeviceEntry) -> float:
        """The bench time of ``entry``'s current bench: bench_s · 2^(benches − 1), capped."""
        return min(self.bench_s * 2 ** max(entry.benches - 1, 0), self.bench_max_s)

    def due_probes(self) -> list[DeviceEntry]:
        """Benched devices whose back-off has passed; each is returned once (now probing)."""
        now = self.clock()
        with self.lock:
            due = [
                d
                for d in self.devices.values()
                if d.benched_until is not None and not d.probing and now >= d.benched_until
            ]
            for d in due:
                d.probing = True
        return due

    def probe_result(self, slot: int, answered: bool) -> bool:
        """Readmit a probed device that answered in time (True), or bench it again (False)."""
        with self.lock:
            entry = self.devices.get(slot)
            if entry is None or not entry.benched:
                return answered
            if answered:
                entry.benched_until, entry.probing, entry.strikes = None, False, 0
                entry.last_seen = max(entry.last_seen, self.clock())
                self.changed()
                return True
            self._bench(entry, self.clock())
            return False

    def preferred(self, key: ExpertKey, per_token_s: Any) -> DeviceEntry | None:
        """The host of ``key`` with the best channel, usable or not (whom a skipped call is charged to)."""
        hosts = [d for d in self.devices.values() if key in d.experts]
        return min(hosts, key=lambda d: (per_token_s[d.slot], d.slot)) if hosts else None

    def hosts(self, key: ExpertKey) -> list[DeviceEntry]:
        """The usable devices hosting ``key``."""
        now = self.clock()
        return [d for d in self.devices.values() if key in d.experts and self.usable(d, now)]

    def choose(self, key: ExpertKey, per_token_s: Any) -> DeviceEntry | None:
        """The usable host of ``key`` whose slot serves one token fastest (``per_token_s`` [U]; ∞:
        the BS cannot reach the slot, its link is in outage)."""
        hosts = [d for d in self.hosts(key) if math.isfinite(per_token_s[d.slot])]
        return min(hosts, key=lambda d: (per_token_s[d.slot], d.slot)) if hosts else None

    def expert_slots(self, per_token_s: Any, layer: int | None = None) -> list[int]:
        """For the policy's view (one device per expert): per expert e, the best usable slot hosting
        (``layer``, e) — a planned placement differs by layer — or e in any layer (``layer`` None,
        or no host of that layer's shard), else any slot hosting it, else e mod U. Asked again with
        the same times (one cell snapshot's) and layer, the answer is kept while who is usable
        stays the same (epoch)."""
        version, until = self.epoch()
        kept = self.kept_slots
        same = kept is not None and kept[0] is per_token_s and kept[1] == (version, layer)
        if kept is not None and same and self.clock() < until:
            return list(kept[2])
        slots = self._expert_slots(per_token_s, self.hosting(version), layer)
        self.kept_slots = (per_token_s, (version, layer), tuple(slots))
        return slots

    def hosting(self, version: int) -> dict[tuple[int | None, int], list[DeviceEntry]]:
        """Devices hosting each (layer, e) and each (None, e): e in any layer; kept per version."""
        if self.kept_hosts is not None and self.kept_hosts[0] == version:
            return self.kept_hosts[1]
        index: dict[tuple[int | None, int], list[DeviceEntry]] = {}
        for d in self.devices.values():
            for key in sorted(d.experts):
                index.setdefault(key, []).append(d)
            for e in sorted({k[1] for k in d.experts}):
                index.setdefault((None, e), []).append(d)
        self.kept_hosts = (version, index)
        return index

    def _expert_slots(
        self, per_token_s: Any, index: dict[tuple[int | None, int], list[DeviceEntry]], layer: int | None
    ) -> list[int]:
        now = self.clock()
        slots = []
        for e in range(self.num_experts):
            hosting = index.get((layer, e)) or index.get((None, e), [])
            live = [d for d in hosting if self.usable(d, now)]
            pool = live or hosting
            best = min(pool, key=lambda d: (per_token_s[d.slot], d.slot)) if pool else None
            slots.append(best.slot if best else e % self.num_slots)
        return slots

    def overheads_s(self) -> list[float]:
        """ô_u [U]: each slot's running estimate of the software's own cost per message (s of the
        cell; 0 while unmeasured or without a device)."""
        with self.lock:
            entries = [self.devices.get(u) for u in range(self.num_slots)]
        return [(e.overhead_s or 0.0) if e is not None else 0.0 for e in entries]

    def note_overheads(self, samples_s: Iterable[float], pings_s: Mapping[int, float]) -> None:
        """Fold each slot's sample o_u (s of the cell; NaN: none) into its estimate, which starts at
        its ping round trip when there is one (:func:`~wdmoe.latency.overhead.running_estimate_s`)."""
        with self.lock:
            for slot, sample in enumerate(samples_s):
                entry = self.devices.get(slot)
                if entry is None or math.isnan(sample):
                    continue
                if entry.overhead_s is None and slot in pings_s:
                    entry.overhead_s = running_estimate_s(None, pings_s[slot])
                entry.overhead_s = running_estimate_s(entry.overhead_s, sample)

    def missing(self) -> list[ExpertKey]:
        """(layer, expert) pairs no registered device hosts."""
        hosted = set().union(*(d.experts for d in self.devices.values())) if self.devices else set()
        return [(i, e) for i in self.layers for e in range(self.num_experts) if (i, e) not in hosted]

    def ready(self, min_devices: int = 1) -> bool:
        """At least ``min_devices`` usable devices and every expert hosted by one."""
        now = self.clock()
        live = [d for d in self.devices.values() if self.usable(d, now)]
        return len(live) >= min_devices and not self.missing()

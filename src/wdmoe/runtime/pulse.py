"""The BS's live face: one ``step`` event per forward, the dashboard's hello and its controls.

:class:`Pulse` (kept in the BS's :class:`~wdmoe.runtime.books.Books`) collects, layer by layer of
the forward in flight, what the policy left out of the router's candidates and how many experts
got no device answer; after the forward, :meth:`Pulse.step` turns the forward's layer prices
(:func:`wdmoe.dashboard.steps.step_values`), those counts, each device's running totals and the
requests it served into the ``step`` event that the metrics log, the dashboard and the Prometheus
metrics read. Work is only done when someone listens (``Books.listening``), and everything kept
is bounded (the per-layer scratch is emptied every forward, and capped in between).

:func:`attach_dashboard` serves a BS's dashboard (page, events, /metrics, controls) beside its
gRPC server; :func:`apply_control` is what an authorised control request does.
"""

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wdmoe.dashboard.hub import Event, Hub
from wdmoe.dashboard.steps import cell_values, step_values
from wdmoe.errors import ConfigError

if TYPE_CHECKING:
    from wdmoe.dashboard.http import DashboardServer
    from wdmoe.runtime.bs import BaseStation
    from wdmoe.runtime.dispatch import Forward

SCRATCH = 4096  # per-layer counts kept between two forwards at most (tools that run bare layers)


class Pulse:
    """Per-forward scratch and running per-device totals for the ``step`` event (see the module doc)."""

    def __init__(self, num_slots: int) -> None:
        self.left_out: deque[int] = deque(maxlen=SCRATCH)  # per layer: (token, candidate) pairs not kept
        self.failed: deque[int] = deque(maxlen=SCRATCH)  # per layer: experts dropped without an answer
        self.tokens = np.zeros(num_slots)  # tokens sent to each slot since the BS started
        self.last_drops = np.zeros(num_slots)  # each slot's failed + skipped calls at the last step
        self.steps = 0
        self.lock = threading.Lock()

    def selected(self, keep: torch.Tensor) -> None:
        """A layer's selection: ``keep`` [N, K] of the router's candidates."""
        self.left_out.append(int((~keep).sum()))

    def failed_layer(self, dropped: int) -> None:
        """A layer's experts that got no answer and were dropped (0 for a fallback at the BS)."""
        self.failed.append(dropped)

    def step(
        self, bs: "BaseStation", fwd: "Forward", measured_s: float, predicted_s: float
    ) -> dict[str, Any]:
        """The ``step`` event of the forward ``fwd`` that just ended (times in seconds of the cell)."""
        with self.lock:
            self.steps += 1
            left_out, failed = list(self.left_out), list(self.failed)
            self.left_out.clear()
            self.failed.clear()
            for p in fwd.layers:
                self.tokens += p.device_tokens
            drops = self.device_drops(bs)
            fresh, self.last_drops = drops - self.last_drops, drops
            tokens = self.tokens.tolist()
        requests = [
            {
                "id": r.id,
                "tokens": len(r.forwards),
                "of": r.max_new_tokens,
                "measured_s": measured_s,
                "predicted_s": predicted_s,
            }
            for r in fwd.requests
        ]
        snap = fwd.snap
        priced = bs.last_priced if fwd.layers and bs.last_priced is not None else fwd.layers
        return step_values(
            priced,
            snap.true,
            snap.true_up,
            source="bs",
            step=self.steps,
            t_s=float(snap.true.time_s),
            decode=all(len(r.forwards) > 1 for r in fwd.requests),
            measured_s=measured_s,
            predicted_s=predicted_s,
            left_out=left_out[-len(fwd.layers) :] if fwd.layers else [],
            dropped=failed[-len(fwd.layers) :] if fwd.layers else [],
            totals={"tokens": tokens, "drops": drops.tolist(), "dropped_now": fresh.tolist()},
            requests=requests,
            running=len(bs.engine.running),  # users in the batch and waiting to join it
            waiting=len(bs.engine.waiting),
        )

    def device_drops(self, bs: "BaseStation") -> np.ndarray:
        """Each slot's calls without an answer (failed or not sent) since the BS started [U]."""
        with bs.books.lock:
            return np.array(
                [float(sum(st.failures.values()) + st.skipped) for _, st in sorted(bs.books.stats.items())]
            )


# --- the dashboard of a BS ---------------------------------------------------------------------


def devices_event(bs: "BaseStation") -> dict[str, Any]:
    """Each slot: address, state, and the experts it hosts as ``layer:expert`` strings."""
    rows = []
    for u in range(bs.num_slots):
        row = bs.device_row(u)
        entry = bs.registry.devices.get(u)
        experts = sorted(entry.experts) if entry is not None else []
        rows.append(row | {"experts": [f"{layer}:{e}" for layer, e in experts]})
    return {"devices": rows}


def controls_event(bs: "BaseStation", enabled: bool = True) -> dict[str, Any]:
    """What the controls show: the policy, its parameters and the allocator in force, the choices."""
    from wdmoe.allocation import ALLOCATORS
    from wdmoe.policies import POLICIES

    s = bs.settings
    return {
        "enabled": enabled,
        "policy": s.policy,
        "params": dict(s.params),
        "allocator": s.allocator,
        "policies": POLICIES.names(),
        "allocators": ALLOCATORS.names(),
    }


def hello(bs: "BaseStation") -> list[Event]:
    """What a new viewer of a BS's dashboard is shown first."""
    label = f"BS · {bs.settings.mode} mode · time scale {bs.settings.time_scale:g}"
    return [
        ("cell", cell_values(bs.scenario, label, "bs")),
        ("devices", devices_event(bs)),
        ("controls", controls_event(bs)),
    ]


def apply_control(bs: "BaseStation", request: dict[str, Any]) -> dict[str, Any]:
    """Switch the policy (and its parameters) and the allocator between two forwards: the next
    forward (every request's next step) runs with them. Raises ConfigError for a bad value."""
    from wdmoe.allocation import allocator_for
    from wdmoe.policies import make_policy

    unknown = set(request) - {"policy", "params", "allocator"}
    if unknown:
        raise ConfigError(f"unknown control fields {sorted(unknown)}; allowed: policy, params, allocator")
    s = bs.settings
    name = str(request.get("policy", s.policy))
    params = request.get("params", dict(s.params) if name == s.policy else {})
    if not isinstance(params, dict):
        raise ConfigError(f"params must be an object of NAME: value, got {params!r}")
    policy = make_policy(name, **params)
    allocator_name = str(request.get("allocator", s.allocator))
    allocator = allocator_for(allocator_name, bs.scenario, s.energy_slack)
    with bs.forward_lock:  # never in the middle of a forward
        bs.wm.set_policy(policy)
        bs.dispatcher.allocator = allocator
        bs.settings = replace(s, policy=name, params=params, allocator=allocator_name)
        bs.dispatcher.settings = bs.settings
    values = controls_event(bs)
    bs.books.event("controls", **values)
    return values


def attach_dashboard(bs: "BaseStation", host: str, port: int, token: str) -> "DashboardServer":
    """Serve ``bs``'s dashboard and Prometheus metrics on host:port (0: a free port); both read
    the BS's events. Close the returned server to stop it (it unsubscribes)."""
    from wdmoe.dashboard.http import DashboardServer
    from wdmoe.runtime.metrics import BSMetrics

    hub = Hub(lambda: hello(bs))
    metrics = BSMetrics(bs)
    stops = [bs.books.subscribe(metrics.observe), bs.books.subscribe(devices_relay(bs, hub))]
    control = lambda r: apply_control(bs, r)  # noqa: E731
    return DashboardServer(
        hub, host, port, metrics=metrics.exposition, control=control, token=token, on_close=stops
    )


def devices_relay(bs: "BaseStation", hub: Hub) -> Callable[[str, dict[str, Any]], None]:
    """The hub's subscriber: every event as it is, and the device table again when a device's
    state changes (it came up, went down, was benched or readmitted)."""

    def relay(kind: str, values: dict[str, Any]) -> None:
        hub.publish(kind, values)
        if kind.startswith("device_"):
            hub.publish("devices", devices_event(bs))

    return relay

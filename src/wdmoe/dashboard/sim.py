"""The simulator's events for the dashboard: a forward listener beside a
:class:`~wdmoe.simulate.Simulation` (attached after it, so it sees each forward's layers and the
records the simulation has just written; the simulation itself is not touched).

Each forward becomes a ``step`` event of the shape the BS publishes (:mod:`wdmoe.dashboard.steps`):
times are the simulation's (``predicted_s`` the forward's simulated seconds; nothing is measured),
``left_out`` per layer the (token, expert) pairs the policy did not run, ``dropped`` per layer the
calls the deadline rule cut (late or lost to outage). ``pace_s`` pauses after each forward so that
a person can follow a run that the simulator finishes in a second.
"""

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from wdmoe.dashboard.hub import Hub
from wdmoe.dashboard.steps import step_values
from wdmoe.models.install import ForwardCall
from wdmoe.simulate import Simulation, StepRecord


class SimFeed:
    """Publishes ``sim``'s forwards on ``hub`` (see the module doc)."""

    def __init__(self, sim: Simulation, hub: Hub, label: str, pace_s: float = 0.0) -> None:
        self.sim, self.hub, self.label, self.pace_s = sim, hub, label, pace_s
        self.seen = 0  # records already published
        self.steps = itertools.count(1)
        u = sim.scenario.cell.num_devices
        self.tokens, self.drops = np.zeros(u), np.zeros(u)
        self.current: Any = None

    def before_forward(self, call: ForwardCall) -> None:
        self.current = self.sim.current  # the simulation's pass (its listener ran first)
        self.seen = len(self.sim.records)

    def after_forward(self, call: ForwardCall, ok: bool) -> None:
        fwd, self.current = self.current, None
        records = self.sim.records[self.seen :]
        if not ok or fwd is None or not fwd.layers or not records:
            return
        self.hub.publish("step", self.step(fwd.layers, records))
        if self.pace_s:
            time.sleep(self.pace_s)

    def step(self, layers: list[Any], records: list[StepRecord]) -> dict[str, Any]:
        """The ``step`` event of one forward from its layer runs and its rows' records."""
        cut = sum(r.cut_late | r.cut_down for r in records)  # [L, U]
        self.tokens += sum(r.device_tokens.sum(0) for r in records)
        self.drops += np.asarray(cut).sum(0)
        last = layers[-1].snap
        return step_values(
            [lr.priced for lr in layers],
            last.true,
            last.true_up,
            source="sim",
            label=self.label,
            step=next(self.steps),
            t_s=float(self.sim.time_s),
            decode=all(r.phase == "decode" for r in records),
            measured_s=None,
            predicted_s=max(r.total_s for r in records),
            left_out=[int(x) for x in sum(r.dropped_tokens.sum(-1) for r in records)],
            dropped=[int(x) for x in np.asarray(cut).sum(-1)],
            totals={"tokens": self.tokens.tolist(), "drops": self.drops.tolist()},
            requests=[],
        )


def hosted(sim: Simulation, slot: int) -> list[str]:
    """The shards device ``slot`` hosts, as "layer:expert": a planned placement's (``cell.placement``,
    per layer), else "*:e" for expert e of every layer (expert e on device e mod U)."""
    if sim.placement is not None:
        return [
            f"{layer}:{e}"
            for layer, row in sorted(sim.placement.items())
            for e in np.flatnonzero(row == slot)
        ]
    placement = np.asarray(sim.cell.snapshot(sim.time_s).view.placement)  # expert → slot [E], all layers
    return [f"*:{e}" for e in np.flatnonzero(placement == slot)]


@contextlib.contextmanager
def watching(sim: Simulation, hub: Hub, label: str, pace_s: float = 0.0) -> Iterator[SimFeed]:
    """Publish ``sim``'s forwards on ``hub`` while inside (enter it inside ``sim.attached()``)."""
    feed = SimFeed(sim, hub, label, pace_s)
    hub.publish("run", {"label": label})
    rows = [
        {"slot": u, "state": "simulated", "experts": hosted(sim, u)}
        for u in range(sim.scenario.cell.num_devices)
    ]
    hub.publish("devices", {"devices": rows})
    with sim.wm.attach(feed):
        yield feed


def request_events(
    hub: Hub, request: int | str, on_text: Callable[[str], None]
) -> tuple[Callable[[str], None], Callable[[list[StepRecord], str], None]]:
    """For one simulated request: ``on_text`` that also publishes each piece, and ``done(records,
    text)`` that publishes its answer and its simulated TTFT / TPOT (the BS's ``request`` shape;
    simulated seconds stand for both measured and predicted)."""

    def text(piece: str) -> None:
        on_text(piece)
        if piece:
            hub.publish("text", {"id": request, "text": piece})

    def done(records: list[StepRecord], answer: str) -> None:
        decode = [r.total_s for r in records if r.phase == "decode"]
        tpot = float(np.mean(decode)) if decode else 0.0
        ttft = next((r.total_s for r in records if r.phase == "prefill"), None)
        dropped = int(sum(r.dropped_tokens.sum() for r in records))
        calls = int(sum(r.expert_tokens.sum() for r in records)) + dropped
        hub.publish("answer", {"id": request, "text": answer})
        hub.publish(
            "request",
            {
                "id": request,
                "new_tokens": len(decode) + 1,
                "ttft_s": ttft,
                "forwards": len(records),
                "token_measured_s": tpot,
                "token_predicted_s": tpot,
                "dropped": dropped,
                "simulated": True,
                "expert_calls": calls,
            },
        )

    return text, done

"""What the simulator records of every request's forward, and how a forward's rows are priced.

:func:`price_rows` turns the layers a forward ran through (each layer's cell snapshot, its calls
priced and settled, the experts skipped up front) and its rows' expert loads into one
:class:`StepRecord` per row: each row as its own request on the channel of every layer's time
(a scorer's batch), or, ``joint``, the rows as concurrent requests served together (continuous
batching: the step's joint times, each row's own experts). Each record carries the energy its
devices spent (:mod:`wdmoe.latency.energy`; joint rows their share of the batch's).
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from wdmoe.channel.units import BoolArray, FloatArray
from wdmoe.config import ScenarioConfig
from wdmoe.latency.cell import CellSnapshot
from wdmoe.latency.deadline import DeadlineRule
from wdmoe.latency.energy import DeviceEnergy, EnergyModel, attribute, device_energy
from wdmoe.latency.pricing import Calls, Priced, forward_overheads, price_layer, rows_overheads, stack_layers
from wdmoe.loads import RowLoads

if TYPE_CHECKING:
    from wdmoe.allocation import Allocator


@dataclass(frozen=True)
class StepRecord:
    """One request's forward, accounted. Arrays: [L, E] per expert, [L, U] per device, [L] per
    layer (s); snr_db_dl / snr_db_ul [U]: the true SNR at an equal share B/U when its first layer
    ran (dB). Per layer and device: link_down (the link truly in outage), cut_late / cut_down (a call
    with work cut at its deadline / lost to outage), skipped_tokens (tokens of experts not sent:
    the BS saw their device's link down); lost_tokens: the (token, expert) pairs the policy sent
    that did not come back (cut, lost or skipped), all layers. compute_j / radio_j [L, U]: the
    energy each device spent computing / on its radio for this request (J,
    :mod:`wdmoe.latency.energy`; None: not accounted, e.g. a record made by hand)."""

    phase: str
    start_s: float
    new_tokens: int
    expert_tokens: FloatArray
    dropped_tokens: FloatArray
    retained_mass: float
    device_tokens: FloatArray
    device_dropped: FloatArray
    snr_db_dl: FloatArray
    snr_db_ul: FloatArray
    downlink_s: FloatArray
    compute_s: FloatArray
    uplink_s: FloatArray
    waiting_s: FloatArray
    bs_s: FloatArray
    head_s: float
    link_down: BoolArray
    cut_late: BoolArray
    cut_down: BoolArray
    skipped_tokens: FloatArray
    lost_tokens: float = 0.0
    compute_j: FloatArray | None = None
    radio_j: FloatArray | None = None

    @property
    def total_s(self) -> float:
        return float(self.waiting_s.sum() + self.bs_s.sum() + self.head_s)

    @property
    def energy_j(self) -> float | None:
        """All devices' energy for this request, compute + radio over layers (J; None: unknown)."""
        if self.compute_j is None or self.radio_j is None:
            return None
        return float(self.compute_j.sum() + self.radio_j.sum())


@dataclass(frozen=True)
class LayerRun:
    """One MoE layer of a forward as it ran: its snapshot, the forward's calls priced and settled,
    the experts skipped up front [E] and the software's own cost per message it was priced with
    (s, scalar or [U]; None: not priced)."""

    snap: CellSnapshot
    priced: Priced
    skipped: BoolArray
    overhead_s: Any = None


def price_rows(
    scenario: ScenarioConfig,
    allocator: "Allocator",
    rule: DeadlineRule,
    layers: Sequence[LayerRun],
    loads: RowLoads,
    new_tokens: Sequence[int],
    context: int | Sequence[int],
    start_s: float,
    joint: bool = False,
) -> list[StepRecord]:
    """Each row's request (loads [R, L, E]) priced on the layers it ran through (their snapshots
    and cut calls; all rows of a layer at once), with its own BS compute and LM head; ``joint``:
    the rows ran together, and each carries the forward's times as it ran (its layers' joint
    prices, every row's BS compute and head) with its own experts. ``context``: cached tokens
    before the forward, of all rows or per row."""
    contexts = [context] * len(new_tokens) if isinstance(context, int) else list(context)
    sent = loads.sent
    views = [lr.snap.view for lr in layers]
    per_layer = [] if joint else price_alone(allocator, rule, layers, sent)
    per_device = lambda x: np.stack([v.device_tokens(x[:, i]) for i, v in enumerate(views)], 1)  # noqa: E731
    skip = np.stack([lr.skipped for lr in layers])
    skipped, ran = per_device(np.where(skip, sent, 0.0)), per_device(np.where(skip, 0.0, sent))
    energy = EnergyModel.from_scenario(scenario, views[0].channel.num_devices)
    dropped = per_device(loads.dropped)
    link_down = np.stack([~lr.snap.true_up for lr in layers])
    snr_dl, snr_ul = snr_at_start(layers)
    overheads = rows_overheads(scenario, new_tokens, contexts)
    together = stack_layers([lr.priced for lr in layers], *overheads) if joint else None
    out = []
    for r, (n, c) in enumerate(zip(new_tokens, contexts, strict=True)):
        priced = together or stack_layers([p.take(r) for p in per_layer], *forward_overheads(scenario, n, c))
        lat, spent = priced.latency, row_energy(energy, views[0].cost.flops_per_token, priced, ran[r])
        out.append(
            StepRecord(
                "prefill" if c == 0 else "decode",
                start_s,
                n,
                loads.kept[r],
                loads.dropped[r],
                loads.mass[r],
                priced.device_tokens,
                dropped[r],
                snr_dl,
                snr_ul,
                lat.devices.downlink_s,
                lat.devices.compute_s,
                lat.devices.uplink_s,
                lat.waiting_s,
                lat.bs_s,
                lat.head_s,
                link_down,
                priced.late,
                priced.down,
                skipped[r],
                float(np.clip(loads.sent[r] - loads.kept[r], 0, None).sum()),
                spent.compute_j,
                spent.radio_j,
            )
        )
    return out


def snr_at_start(layers: Sequence[LayerRun]) -> tuple[FloatArray, FloatArray]:
    """The true SNR [U] (dB) of each direction at an equal share B/U when the first layer ran."""
    first = layers[0].snap.true
    share = first.equal_share_hz()
    dl, ul = (10 * np.log10(np.maximum(link.snr(share), 1e-30)) for link in (first.dl, first.ul))
    return dl, ul


def price_alone(
    allocator: "Allocator", rule: DeadlineRule, layers: Sequence[LayerRun], sent: FloatArray
) -> list[Priced]:
    """Each layer's rows priced as requests of their own: loads [R, U] per layer, the experts
    skipped up front taken out, calls settled as the batch's were."""
    out = []
    for i, lr in enumerate(layers):
        settled = lr.priced
        calls = Calls(rule, lr.snap.true_up, late=settled.late, down=settled.down, overhead_s=lr.overhead_s)
        tokens = lr.snap.view.device_tokens(np.where(lr.skipped, 0.0, sent[:, i]))
        out.append(price_layer(lr.snap.view, lr.snap.true, allocator, tokens, calls))
    return out


def row_energy(model: EnergyModel, flops_per_token: float, priced: Priced, own_tokens: Any) -> DeviceEnergy:
    """Energy per device [L, U] of a request whose devices ran ``own_tokens`` [L, U] in the layers
    ``priced`` (its own, or the batch's it travelled in: it is charged its share)."""
    spent = device_energy(model, priced.device_tokens, priced.latency.devices, flops_per_token)
    return attribute(spent, own_tokens, priced.device_tokens)

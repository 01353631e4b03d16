"""How the BS treats devices, links and users: one typed, validated value (no I/O). The deadline
rule it sets for every device call is the core's (:class:`~wdmoe.latency.deadline.DeadlineRule`),
the one the simulator settles its calls with."""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wdmoe.config import check_choice, check_range
from wdmoe.formats import FORMATS
from wdmoe.latency.deadline import MODES, DeadlineRule
from wdmoe.runtime.wire import DTYPES

__all__ = ["DATA_PLANES", "MODES", "WIRE_DTYPES", "RuntimeSettings"]
DATA_PLANES = ("stream", "grpc")
WIRE_DTYPES = {str(d).removeprefix("torch."): d for d in DTYPES.values() if d.is_floating_point}
WIRE_FORMATS = sorted({*WIRE_DTYPES, *FORMATS, "adaptive"})  # what ``wire_dtype`` may name


@dataclass(frozen=True)
class RuntimeSettings:
    """How the BS treats devices and links.

    mode: a late / failed expert is waited for (``wait``: up to max_wait_s), dropped (``drop``) or
    run from the BS's local copy (``fallback``). slack, grace_s: the deadline of a device call is
    time_scale·slack·t_u(estimate) + grace_s wall seconds (capped at max_wait_s).
    emulate_links: wait out the channel's DL/UL delays; time_scale: wall seconds per simulated second
    (0.001 runs an hour of cell in 3.6 s). wire_dtype: how hidden states travel (float32 is exact),
    a dtype or a wire format of :mod:`wdmoe.formats` (int8, fp8: with row scales; ``adaptive``: per
    device and layer by the scenario's ``wire.adaptive_*`` rule on the BS's channel estimate).
    bench_after: failed calls in a row that bench a device for bench_s (doubling while it keeps
    failing its probes, up to 60 s). max_active: generations served at once; max_queue: requests
    that may wait for a turn beyond those (more are refused with RESOURCE_EXHAUSTED). data_plane:
    how expert calls travel to a device that advertises a data plane (``stream``: one persistent
    connection per device, :mod:`~wdmoe.runtime.dataplane`; ``grpc``: a RunExpert call each, as
    devices without one are always called). software_overhead: ``measured``: the prediction the
    BS records (and each call's budget) adds each busy device's running estimate of what its
    messages cost beyond the latency model, and each forward's the BS's own running estimate of its
    compute beyond the model (:mod:`wdmoe.latency.overhead`); ``none``: not priced (it is still
    measured).
    """

    policy: str = "topk"
    params: Mapping[str, Any] = field(default_factory=dict)
    allocator: str = "equal"
    mode: str = "drop"
    slack: float = 3.0
    grace_s: float = 0.25
    max_wait_s: float = 30.0
    emulate_links: bool = False
    time_scale: float = 1.0
    wire_dtype: str = "float32"
    heartbeat_s: float = 1.0
    bench_after: int = 3
    bench_s: float = 5.0
    max_active: int = 16
    max_queue: int = 256
    seed: int | None = None
    csi_delay_blocks: int = 0
    csi_error_std_db: float = 0.0
    trace_blocks: int = 20000
    data_plane: str = "stream"
    software_overhead: str = "none"
    energy_slack: float = 0.1

    def __post_init__(self) -> None:
        DeadlineRule(self.mode, self.slack, self.grace_s, self.max_wait_s)  # validates them
        check_choice("data_plane", self.data_plane, list(DATA_PLANES))
        check_choice("software_overhead", self.software_overhead, ["none", "measured"])
        check_choice("wire_dtype", self.wire_dtype, WIRE_FORMATS)
        check_range("time_scale", self.time_scale, 0.0, 1e6, lo_open=True)
        check_range("heartbeat_s", self.heartbeat_s, 0.01, 3600.0)
        check_range("bench_after", self.bench_after, 1, 1e6)
        check_range("bench_s", self.bench_s, 0.0, 3600.0, lo_open=True)
        check_range("max_active", self.max_active, 1, 4096)
        check_range("max_queue", self.max_queue, 0, 1e6)
        check_range("trace_blocks", self.trace_blocks, 1, 1e8)
        check_range("energy_slack", self.energy_slack, 0.0, 100.0)

    @property
    def deadline(self) -> DeadlineRule:
        """The deadline rule of every device call (the simulator's too)."""
        return DeadlineRule(self.mode, self.slack, self.grace_s, self.max_wait_s)

    def call_budgets_s(self, expected_s: Any) -> np.ndarray:
        """The wall seconds each device call [U] may take (:meth:`DeadlineRule.budgets_s` at this
        BS's time scale)."""
        return self.deadline.budgets_s(expected_s, self.time_scale)

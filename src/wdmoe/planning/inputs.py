"""What the placement optimiser reads: router usage on calibration text, the cell's average channel,
device memory in shards (no file I/O; the model runs in-process).

- usage f [L, E]: over calibration tokens (never benchmark data, :mod:`wdmoe.models.calibration`),
  the fraction of tokens whose selected experts include e in MoE layer l (Σ_e f_le = k with top-k);
- the average channel: per device and direction, the gain averaged over ``blocks`` fading blocks
  of the scenario's trace, h̄_u = (1/N)·Σ_n h_u[n] (E|g|² = 1: the large-scale gain, path loss and
  shadowing), through the cell's own link budget;
- capacity_u = ⌊memory_u / shard_bytes⌋, shard_bytes = 3·D·F·bytes per parameter (a SwiGLU
  expert: gate, up, down), capped at the L·E shards there are.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from wdmoe.allocation import make_allocator
from wdmoe.channel import generate_trace
from wdmoe.channel.state import ChannelState
from wdmoe.channel.trace import ChannelTrace
from wdmoe.channel.units import FloatArray
from wdmoe.config import ScenarioConfig, check_range
from wdmoe.errors import ConfigError
from wdmoe.latency.devices import devices_for
from wdmoe.latency.view import ExpertLatency
from wdmoe.planning.optimise import IntArray, PlanProblem

if TYPE_CHECKING:
    from wdmoe.models.install import WirelessModel


def average_channel(trace: ChannelTrace) -> ChannelState:
    """The trace's mean channel: gains h̄_u [U] averaged over its blocks in each direction (module
    doc), at block 0's geometry."""
    first = trace.state(0)
    dl = trace.budget.downlink(np.asarray(trace.gain(trace.fading_dl).mean(axis=0)))
    ul = trace.budget.uplink(np.asarray(trace.gain(trace.fading_ul).mean(axis=0)))
    return ChannelState(
        first.time_s,
        first.positions_m,
        first.distance_m,
        first.los,
        first.pathloss_db,
        first.shadowing_db,
        dl,
        ul,
        first.bandwidth_hz,
    )


def shard_bytes(scenario: ScenarioConfig, bytes_per_param: int = 2) -> int:
    """Bytes of one expert shard: 3·D·F parameters (SwiGLU) × ``bytes_per_param``."""
    m = scenario.model
    return 3 * m.hidden_size * m.ffn_size * bytes_per_param


def memory_capacity(scenario: ScenarioConfig, bytes_per_param: int = 2) -> IntArray:
    """capacity_u [U] = ⌊memory of device u's class / shard bytes⌋, at most L·E."""
    classes = devices_for(scenario.cell.device_classes, scenario.cell.num_devices)
    m = scenario.model
    per = shard_bytes(scenario, bytes_per_param)
    caps = [min(c.memory_bytes // per, m.num_layers * m.num_experts) for c in classes]
    return np.array(caps, dtype=np.int64)


def plan_problem(
    scenario: ScenarioConfig,
    usage: Any,
    capacity: Any,
    *,
    seed: int = 0,
    blocks: int = 2000,
    samples: int = 0,
    tokens: float = 64.0,
    allocator: str = "equal",
) -> PlanProblem:
    """The problem on the scenario's cell, from ``blocks`` fading blocks of the trace of ``seed``
    (the simulator's): J priced on ``samples`` blocks evenly spread over them (outage skipped as
    the simulator skips it), or on their average channel (samples = 0); device classes, expert
    cost, the equal split (or ``allocator``'s per layer)."""
    check_range("plan.blocks", blocks, 1, 1e7)
    check_range("plan.samples", samples, 0, blocks)
    f = np.asarray(usage, dtype=np.float64)
    m = scenario.model
    if f.shape != (m.num_layers, m.num_experts):
        raise ConfigError(
            f"usage has shape {f.shape}; the scenario's model {m.name} has "
            f"({m.num_layers}, {m.num_experts}) (MoE layers, experts)"
        )
    trace = generate_trace(scenario, blocks, seed)
    view = ExpertLatency.from_scenario(scenario, average_channel(trace))
    picked = np.linspace(0, blocks - 1, samples).astype(np.int64) if samples else np.zeros(0, np.int64)
    channels = tuple(trace.state(int(b)) for b in picked)
    alloc = None if allocator == "equal" else make_allocator(allocator)
    cap = np.asarray(capacity, dtype=np.int64)
    return PlanProblem(f, view, cap, tokens, alloc, channels, scenario.cell.min_se_bps_per_hz)


def calibration_chunks(tok: Any, texts: Sequence[str], chunks: int, chunk_tokens: int) -> torch.Tensor:
    """[N, chunk_tokens] token ids: ``chunks`` equal pieces spread evenly over the texts."""
    docs = [tok(text, add_special_tokens=False)["input_ids"] for text in texts]
    per_doc, extra = divmod(chunks, len(docs))
    pieces = []
    for i, ids in enumerate(docs):
        want = per_doc + (i < extra)
        stride = max((len(ids) - chunk_tokens) // max(want, 1), 1)
        pieces += [ids[j * stride : j * stride + chunk_tokens] for j in range(want)]
    return torch.tensor([p for p in pieces if len(p) == chunk_tokens], dtype=torch.long)


@torch.no_grad()
def router_usage(wm: "WirelessModel", batches: torch.Tensor) -> FloatArray:
    """f [L, E]: per MoE layer (in decoder order), the fraction of tokens whose kept experts
    include e, from the model's own router on ``batches`` [N, S] (its current policy; topk: the
    router's top-k)."""
    layers = sorted(wm.blocks)
    counts = np.zeros((len(layers), wm.num_experts))
    tokens = 0
    wm.recorder.clear()
    wm.recorder.enabled = True
    try:
        for ids in batches:
            wm.model(input_ids=ids[None, :])
            for trace in wm.recorder.clear():
                picked = trace.candidates[trace.keep].reshape(-1)
                counts[layers.index(trace.layer)] += np.bincount(picked.numpy(), minlength=wm.num_experts)
            tokens += int(ids.shape[0])
    finally:
        wm.recorder.enabled = False
    if tokens == 0:
        raise ConfigError("no calibration tokens: give at least one chunk of calibration text")
    return np.asarray(counts / tokens)


def calibration_usage(wm: "WirelessModel", tok: Any, chunks: int = 16, chunk_tokens: int = 128) -> FloatArray:
    """f [L, E] of :func:`router_usage` on ``chunks`` pieces of ``chunk_tokens`` tokens of the
    calibration text (:func:`wdmoe.models.calibration.calibration_texts`; never benchmark data)."""
    from wdmoe.models.calibration import calibration_texts

    check_range("plan.calib_chunks", chunks, 1, 1e6)
    check_range("plan.chunk_tokens", chunk_tokens, 1, 1e6)
    return router_usage(wm, calibration_chunks(tok, calibration_texts(), chunks, chunk_tokens))

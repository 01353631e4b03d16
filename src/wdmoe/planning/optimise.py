"""Expert placement by channel: which device hosts each (layer, expert) shard (pure, no I/O).

The problem (issue 14 item 3; the journal WDMoE places hot experts on good channels). A forward
of T tokens routes n_le = T·f_le of them to expert e of MoE layer l (f [L, E]: router usage on
calibration text, Σ_e f_le = k). A placement p [L, E] (expert → device) gives device u of layer l

    n_lu  = Σ_{e: p_le = u} n_le                                        tokens [L, U]
    T_l   = (1/S)·Σ_s max_{u: n_lsu > 0} t_su(n_lsu),   n_lsu = n_lu·[link u up in sample s]
            t_su of :mod:`wdmoe.latency.model` on channel sample s (a fading block of the trace,
            or the average channel alone, S = 1) at the split B_u (equal, or an allocator's); a
            device whose link is down in a sample is skipped there, as the simulator skips it
    J(p)  = (1/L)·Σ_l T_l                      expected layer latency [s]

minimised subject to Σ_{l,e} [p_le = u] ≤ cap_u (shards a device's memory holds, over all
layers). t_su and T_l are the latency model's own functions
(:func:`~wdmoe.latency.model.device_times`, :func:`~wdmoe.latency.model.waiting_s`; with an
allocator, the latency view's split and times); nothing is re-derived here.

Algorithm: greedy (shards by decreasing usage, each to the device that raises its layer's T_l
least, on the experts placed so far) then local search (move one shard to a device with room;
swap two shards on different devices) until no step lowers J, started from the greedy and from
round-robin (when it fits) and from a few seeded random placements — the best one is kept
(a local optimum: on the tests' small instances it matches brute force). :func:`brute_force` enumerates every
placement (U^(L·E)) and is the oracle of the tests on small instances.

Replicas (r > 1): each shard also goes to the r − 1 fastest devices (one token alone, on the
average channel) with room. They do not change J: a token goes to one host, the best one, and on
the average channel that is always the same; they serve when fading or a failure takes a host out.
Shapes: L MoE layers, E experts, U devices.
"""

import itertools
from dataclasses import dataclass, field, replace

import numpy as np
from numpy.typing import NDArray

from wdmoe.allocation.base import Allocator
from wdmoe.channel.state import ChannelState
from wdmoe.channel.units import FloatArray
from wdmoe.errors import ConfigError
from wdmoe.latency.deadline import link_up
from wdmoe.latency.model import device_times, waiting_s
from wdmoe.latency.view import ExpertLatency

IntArray = NDArray[np.int64]
REL_TOL = 1e-12  # a step must lower J by more than this fraction to count


class InfeasiblePlanError(ConfigError):
    """The devices' memory cannot hold every shard (with its replicas)."""


@dataclass(frozen=True)
class PlanProblem:
    """usage f [L, E] (tokens per token routed to each expert); view: device compute C_u, expert
    cost, the split B_u and a channel (its own placement is not read); capacity [U]: shards each
    device holds (all layers); tokens T per forward; allocator: re-split the band for each layer's
    loads (None: the view's split); channels: S channel snapshots (fading blocks) J averages over,
    a device whose link is down in one (η < ``min_se_bps_per_hz`` at B/U) skipped there as the
    simulator skips it (none: the view's channel alone, every link up)."""

    usage: FloatArray
    view: ExpertLatency
    capacity: IntArray
    tokens: float = 64.0
    allocator: Allocator | None = None
    channels: tuple[ChannelState, ...] = ()
    min_se_bps_per_hz: float = 0.0
    dl_bps: FloatArray = field(init=False, repr=False)  # R_su^DL [S, U] at the view's split
    ul_bps: FloatArray = field(init=False, repr=False)  # R_su^UL [S, U]
    up: FloatArray = field(init=False, repr=False)  # [S, U] link up (1) or skipped (0)

    def __post_init__(self) -> None:
        layers, experts = self.usage.shape
        u = self.num_devices
        assert self.capacity.shape == (u,), f"capacity {self.capacity.shape} != ({u},)"
        if self.tokens <= 0:
            raise ConfigError(f"tokens = {self.tokens!r} is out of range; allowed: (0, inf)")
        if np.any(self.usage < 0):
            raise ConfigError(f"usage has negative entries (min {self.usage.min():g}); allowed: ≥ 0")
        check_capacity(self.capacity, layers * experts)
        states = self.channels or (self.view.channel,)
        band = self.view.bandwidth_hz
        up = [link_up(c, self.min_se_bps_per_hz) for c in states] if self.channels else [np.ones(u)]
        object.__setattr__(self, "dl_bps", np.stack([c.dl.rate_bps(band) for c in states]))
        object.__setattr__(self, "ul_bps", np.stack([c.ul.rate_bps(band) for c in states]))
        object.__setattr__(self, "up", np.stack(up).astype(np.float64))

    @property
    def num_devices(self) -> int:
        return int(self.view.channel.num_devices)

    @property
    def shape(self) -> tuple[int, int]:
        """(L, E)."""
        return int(self.usage.shape[0]), int(self.usage.shape[1])


@dataclass(frozen=True)
class Placement:
    """hosts[l][e]: the devices holding expert e of layer l, its primary (the one priced) first;
    expected_layer_s: J of the primary placement (module doc)."""

    hosts: tuple[tuple[tuple[int, ...], ...], ...]
    expected_layer_s: float

    @property
    def primary(self) -> IntArray:
        """p [L, E]: each shard's primary device."""
        return np.array([[h[0] for h in row] for row in self.hosts], dtype=np.int64)

    def shards(self, num_devices: int) -> list[list[tuple[int, int]]]:
        """Per device u, the (layer index, expert) pairs it holds (U lists, sorted)."""
        out: list[list[tuple[int, int]]] = [[] for _ in range(num_devices)]
        for layer, row in enumerate(self.hosts):
            for expert, hosts in enumerate(row):
                for u in hosts:
                    out[u].append((layer, expert))
        return [sorted(s) for s in out]


def check_capacity(capacity: IntArray, shards: int, replicas: int = 1) -> None:
    """InfeasiblePlanError unless Σ_u cap_u ≥ shards·replicas (and every cap_u ≥ 0)."""
    if np.any(capacity < 0):
        raise InfeasiblePlanError(f"device capacities {capacity.tolist()} must be ≥ 0 shards")
    need, have = shards * replicas, int(capacity.sum())
    if have < need:
        raise InfeasiblePlanError(
            f"the devices hold {have} shards in all (per device {capacity.tolist()}) but "
            f"{shards} shards × {replicas} replica(s) = {need} must be placed; "
            "raise the memory budget (--max-experts) or lower --replicas"
        )


def layer_latencies_s(problem: PlanProblem, layer: int, devices: IntArray) -> FloatArray:
    """T_l [M] of layer ``layer`` for M placements of its experts, devices [M, E] (−1: expert not
    placed yet, no load): n_u = Σ_{e on u} T·f_le [M, U], on each channel sample s the loads of
    reachable devices n_su = n_u·up_su, t_su by the latency model's
    :func:`~wdmoe.latency.model.device_times`, T_l = mean_s max_{u: n_su > 0} t_su."""
    rows = np.atleast_2d(devices)
    n_e = problem.tokens * problem.usage[layer]
    onehot = (rows[..., None] == np.arange(problem.num_devices)).astype(np.float64)  # [M, E, U]
    n = np.einsum("e,meu->mu", n_e, onehot)[:, None, :] * problem.up[None]  # [M, S, U]
    view = problem.view
    if problem.allocator is None:
        t = device_times(n, problem.dl_bps, problem.ul_bps, view.flops_per_s, view.cost).total_s
        return np.asarray(waiting_s(t, n).mean(axis=1))
    out = np.zeros(n.shape[:2])
    states = problem.channels or (view.channel,)
    for (i, s), loads in np.ndenumerate(n.sum(axis=-1)):
        if loads > 0:
            split = replace(view, channel=states[s]).allocate_devices(problem.allocator, n[i, s])
            out[i, s] = float(waiting_s(split.device_time_s(n[i, s]), n[i, s]))
    return np.asarray(out.mean(axis=1))


def layer_latency_s(problem: PlanProblem, layer: int, devices: IntArray) -> float:
    """T_l [s] of one placement devices [E] of layer ``layer`` (:func:`layer_latencies_s`)."""
    return float(layer_latencies_s(problem, layer, devices)[0])


def expected_layer_s(problem: PlanProblem, primary: IntArray) -> float:
    """J(p) = mean_l T_l [s] for a primary placement p [L, E]."""
    return float(np.mean([layer_latency_s(problem, li, primary[li]) for li in range(problem.shape[0])]))


def round_robin_placement(layers: int, experts: int, devices: int) -> IntArray:
    """p_le = e mod U: the cluster's and the simulator's default [L, E]."""
    return np.tile(np.arange(experts, dtype=np.int64) % devices, (layers, 1))


def counts_of(primary: IntArray, devices: int) -> IntArray:
    """Shards per device [U] of a placement [L, E]."""
    return np.bincount(primary.ravel(), minlength=devices).astype(np.int64)


def greedy(problem: PlanProblem) -> IntArray:
    """Shards by decreasing usage, each to the device with room that raises its layer's T_l least
    (ties: the device faster for one token, then the lower index)."""
    layers, experts = problem.shape
    u = problem.num_devices
    speed = problem.view.device_time_s(np.ones(u))  # t_u(1) [U], the tie-break
    primary = np.full((layers, experts), -1, dtype=np.int64)
    room = problem.capacity.copy()
    order = sorted(np.ndindex(layers, experts), key=lambda le: (-problem.usage[le], le))
    for layer, expert in order:
        free = np.flatnonzero(room > 0)
        assert free.size, f"no device has room for shard ({layer}, {expert}); room {room}"
        trials = np.repeat(primary[layer][None, :], free.size, axis=0)
        trials[:, expert] = free
        cost = layer_latencies_s(problem, layer, trials)
        device = int(free[np.lexsort((free, speed[free], cost))[0]])
        primary[layer, expert] = device
        room[device] -= 1
    return primary


def _lower(new_s: float, old_s: float) -> bool:
    return new_s < old_s - REL_TOL * max(abs(old_s), 1e-300)


def moved_costs_s(problem: PlanProblem, p: IntArray) -> FloatArray:
    """C [L, E, U]: T_l when expert e of layer l alone moves to device v (the rest as in p)."""
    layers, experts = p.shape
    u = problem.num_devices
    out = np.empty((layers, experts, u))
    for layer in range(layers):
        trials = np.repeat(p[layer][None, None, :], experts * u, axis=0).reshape(experts, u, experts)
        trials[np.arange(experts), :, np.arange(experts)] = np.arange(u)
        out[layer] = layer_latencies_s(problem, layer, trials.reshape(-1, experts)).reshape(experts, u)
    return out


def _same_layer_swaps(problem: PlanProblem, p: IntArray, cost: FloatArray) -> tuple[float, tuple]:
    """The best swap of two experts of one layer on different devices: (ΔΣ_l T_l, step)."""
    best: tuple[float, tuple] = (0.0, ())
    pairs = [(a, b) for a in range(p.shape[1]) for b in range(a + 1, p.shape[1])]
    for layer in range(p.shape[0]):
        ok = [(a, b) for a, b in pairs if p[layer, a] != p[layer, b]]
        if not ok:
            continue
        trials = np.repeat(p[layer][None, :], len(ok), axis=0)
        idx = np.arange(len(ok))
        a_, b_ = np.array(ok).T
        trials[idx, a_], trials[idx, b_] = p[layer, b_], p[layer, a_]
        gain = layer_latencies_s(problem, layer, trials) - cost[layer]
        i = int(np.argmin(gain))
        if gain[i] < best[0]:
            best = (float(gain[i]), ((layer, ok[i][0]), (layer, ok[i][1])))
    return best


def _cross_layer_swaps(p: IntArray, cost: FloatArray, moved: FloatArray) -> tuple[float, tuple]:
    """The best swap of shards of different layers on different devices: (ΔΣ_l T_l, step), from
    the moved costs C [L, E, U]: Δ = C[a, dev b] + C[b, dev a] − T_la − T_lb."""
    layers, experts = p.shape
    shard_l = np.repeat(np.arange(layers), experts)
    shard_e = np.tile(np.arange(experts), layers)
    dev = p.ravel()
    to_other = moved[shard_l[:, None], shard_e[:, None], dev[None, :]]  # [S, S]: a moved to b's device
    gain = to_other + to_other.T - cost[shard_l][:, None] - cost[shard_l][None, :]
    gain[(shard_l[:, None] == shard_l[None, :]) | (dev[:, None] == dev[None, :])] = np.inf
    i, j = np.unravel_index(int(np.argmin(gain)), gain.shape)
    if not np.isfinite(gain[i, j]):
        return 0.0, ()
    return float(gain[i, j]), ((int(shard_l[i]), int(shard_e[i])), (int(shard_l[j]), int(shard_e[j])))


def _best_move(p: IntArray, cost: FloatArray, moved: FloatArray, room: IntArray) -> tuple[float, tuple]:
    """The best move of one shard to another device with room: (ΔΣ_l T_l, step)."""
    gain = moved - cost[:, None, None]
    gain[:, :, room <= 0] = np.inf
    gain[np.arange(p.shape[0])[:, None], np.arange(p.shape[1])[None, :], p] = np.inf
    li, e, v = np.unravel_index(int(np.argmin(gain)), gain.shape)
    return (float(gain[li, e, v]), ((int(li), int(e)), int(v))) if np.isfinite(gain[li, e, v]) else (0.0, ())


def local_search(problem: PlanProblem, start: IntArray, max_steps: int = 10_000) -> IntArray:
    """Best-improvement steps (a move to a device with room, or a swap) from ``start`` [L, E]
    until none lowers Σ_l T_l by more than REL_TOL of it (or ``max_steps``)."""
    p = start.copy()
    cost = np.array([layer_latency_s(problem, li, p[li]) for li in range(p.shape[0])])
    room = problem.capacity - counts_of(p, problem.num_devices)
    assert np.all(room >= 0), f"start placement exceeds capacity: room {room.tolist()}"
    for _ in range(max_steps):
        moved = moved_costs_s(problem, p)
        steps = [
            ("move", *_best_move(p, cost, moved, room)),
            ("swap", *_cross_layer_swaps(p, cost, moved)),
            ("swap", *_same_layer_swaps(problem, p, cost)),
        ]
        kind, gain, step = min(steps, key=lambda s: s[1])
        if not step or gain >= -REL_TOL * float(cost.sum()):
            break
        if kind == "move":
            (li, e), v = step
            room[p[li, e]] += 1
            room[v] -= 1
            p[li, e] = v
        else:
            a, b = step
            p[a], p[b] = p[b], p[a]
        for layer in {s[0] for s in (step if kind == "swap" else step[:1])}:
            cost[layer] = layer_latency_s(problem, layer, p[layer])
    return p


def brute_force(problem: PlanProblem) -> IntArray:
    """An optimal placement by enumeration of all U^(L·E) assignments within capacity (the oracle
    for small instances): each layer's U^E assignments priced at once, then combined layer by
    layer, dropping partial placements that already exceed a device's capacity."""
    layers, experts = problem.shape
    u = problem.num_devices
    assert u ** (layers * experts) <= 4_000_000, f"{u}^{layers * experts} placements: too many"
    options = np.array(list(itertools.product(range(u), repeat=experts)), dtype=np.int64)  # [A, E]
    option_counts = (options[..., None] == np.arange(u)).sum(axis=1)  # [A, U]
    total = np.zeros(1)
    counts = np.zeros((1, u), dtype=np.int64)
    chosen = np.zeros((1, 0), dtype=np.int64)  # option index per layer so far
    for layer in range(layers):
        cost = layer_latencies_s(problem, layer, options)
        total = (total[:, None] + cost[None, :]).ravel()
        counts = (counts[:, None, :] + option_counts[None, :, :]).reshape(-1, u)
        chosen = np.concatenate(
            [np.repeat(chosen, len(options), axis=0), np.tile(np.arange(len(options)), len(chosen))[:, None]],
            axis=1,
        )
        fits = np.all(counts <= problem.capacity, axis=1)
        total, counts, chosen = total[fits], counts[fits], chosen[fits]
    assert len(total), "capacity admits no placement (check_capacity should have said)"
    return options[chosen[int(np.argmin(total))]]


def add_replicas(problem: PlanProblem, primary: IntArray, replicas: int) -> list[list[list[int]]]:
    """hosts [L][E]: the primary, then r − 1 more devices per shard (hottest shards first), each
    the fastest for one token among those with room not holding the shard yet."""
    u = problem.num_devices
    if not 1 <= replicas <= u:
        raise ConfigError(f"replicas = {replicas} is out of range; allowed: [1, {u}] (the devices)")
    hosts = [[[int(d)] for d in row] for row in primary]
    room = problem.capacity - counts_of(primary, u)
    speed = problem.view.device_time_s(np.ones(u))
    layers, experts = problem.shape
    for layer, expert in sorted(np.ndindex(layers, experts), key=lambda le: (-problem.usage[le], le)):
        for _ in range(replicas - 1):
            free = [
                d for d in np.argsort(speed, kind="stable") if room[d] > 0 and d not in hosts[layer][expert]
            ]
            if not free:
                raise InfeasiblePlanError(
                    f"no device with room left for a replica of (layer {layer}, expert {expert}); "
                    f"capacities {problem.capacity.tolist()}, replicas {replicas}"
                )
            hosts[layer][expert].append(int(free[0]))
            room[free[0]] -= 1
    return hosts


def random_start(problem: PlanProblem, rng: np.random.Generator) -> IntArray:
    """A random placement within capacity: shards in random order, each to a random device with room."""
    layers, experts = problem.shape
    p = np.empty((layers, experts), dtype=np.int64)
    room = problem.capacity.copy()
    for flat in rng.permutation(layers * experts):
        device = int(rng.choice(np.flatnonzero(room > 0)))
        p[flat // experts, flat % experts] = device
        room[device] -= 1
    return p


def plan(problem: PlanProblem, replicas: int = 1, restarts: int = 8, seed: int = 0) -> Placement:
    """The placement of the module doc: local search from greedy, from round-robin (when it fits
    the capacity) and from ``restarts`` random placements (generator ``seed``); the lowest J is
    kept; then the replicas."""
    check_capacity(problem.capacity, int(np.prod(problem.shape)), replicas)
    layers, experts = problem.shape
    starts = [greedy(problem)]
    rr = round_robin_placement(layers, experts, problem.num_devices)
    if np.all(counts_of(rr, problem.num_devices) <= problem.capacity):
        starts.append(rr)
    rng = np.random.default_rng(seed)
    starts += [random_start(problem, rng) for _ in range(restarts)]
    found = [local_search(problem, s) for s in starts]
    costs = [expected_layer_s(problem, p) for p in found]
    best = found[int(np.argmin(costs))]
    hosts = add_replicas(problem, best, replicas)
    frozen = tuple(tuple(tuple(h) for h in row) for row in hosts)
    return Placement(frozen, float(min(costs)))

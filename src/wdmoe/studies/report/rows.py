"""Report rows: evaluation records read, checked and averaged over seeds, each compared with its
vanilla baseline (pure functions, no model code).

Input: the JSON Lines records of `wdmoe eval` / `wdmoe reproduce` (schema:
:func:`wdmoe.eval.results.make_record`). Records that differ only in their channel seed are one
*row*: metrics and latency are averaged over the seeds, and the seed count is shown. Each row is
compared with its *baseline*, the vanilla ``topk`` row with everything else equal (task, model,
top-k, scenario and its overrides — e.g. the bandwidth —, allocator, seeds, limit):

    speed-up   = mean_s(topk) / mean_s(row)                (×, > 1: faster than vanilla)
    p50 speed-up = p50_s(topk) / p50_s(row)                (robust to the deep-fade tail)
    reduction  = 1 − mean_s(row) / mean_s(topk)            (relative latency reduction)
    Δ metric   = metric(row) − metric(topk)                (points ×100 for accuracies)

Latency is per request (one scored sequence, or one GSM8K question with its decode steps). What
outage and deadlines did (:func:`wdmoe.eval.results.outage_summary`) is averaged likewise; records
written before outage was simulated lack it (None / empty). A row whose mean latency is more
than :data:`HEAVY_TAIL_RATIO` × its median gets a note (:func:`tail_note`) saying what the record
shows of the cause.
"""

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wdmoe.errors import ConfigError
from wdmoe.eval.multiple_choice import paired_difference
from wdmoe.eval.results import read_records

# The metric a task's table shows, in order of preference; perplexities are better when lower.
PRIMARY_METRICS = ("acc", "exact_match", "word_perplexity", "token_perplexity", "perplexity")
LOWER_IS_BETTER = frozenset({"word_perplexity", "token_perplexity", "perplexity"})
REQUIRED_FIELDS = (
    "task",
    "n",
    "metrics",
    "latency.mean_s",
    "config.policy.name",
    "config.policy.params",
    "config.top_k",
    "config.scenario.name",
    "config.scenario.overrides",
    "config.allocator",
    "config.seeds.channel",
)
PERCENTILES = ((50, "p50_s"), (95, "p95_s"), (99, "p99_s"))
HEAVY_TAIL_RATIO = 3.0  # mean / p50 above this: the mean is ruled by a few requests


# --- reading and checking records ---------------------------------------------------------------


def _get(record: Mapping[str, Any], dotted: str) -> Any:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, Mapping) or part not in value:
            raise KeyError(dotted)
        value = value[part]
    return value


def check_record(record: Any, where: str) -> None:
    """Raise ConfigError unless ``record`` has the fields a report reads."""
    if not isinstance(record, Mapping):
        raise ConfigError(f"{where}: not a result record (a JSON object), got {type(record).__name__}")
    for name in REQUIRED_FIELDS:
        try:
            _get(record, name)
        except KeyError:
            raise ConfigError(
                f"{where}: not a wdmoe result record: the field {name!r} is missing "
                "(expected the records `wdmoe eval` or `wdmoe reproduce` write)"
            ) from None
    metrics = record["metrics"]
    if not isinstance(metrics, Mapping) or not any(m in metrics for m in PRIMARY_METRICS):
        raise ConfigError(
            f"{where}: the record's metrics {sorted(metrics) if isinstance(metrics, Mapping) else metrics!r} "
            f"hold none of {', '.join(PRIMARY_METRICS)}"
        )


def load_records(path: Path) -> list[dict[str, Any]]:
    """The records of a results file, checked; a clear ConfigError when there are none."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"results file {path} does not exist; give the JSON Lines file `wdmoe eval --out` or "
            "`wdmoe reproduce` wrote"
        )
    if not path.read_text(encoding="utf-8", errors="replace").strip():
        raise ConfigError(f"results file {path} is empty; run `wdmoe eval` or `wdmoe reproduce` first")
    records = read_records(path)
    if not records:
        raise ConfigError(f"results file {path} holds no complete record")
    for i, r in enumerate(records, 1):
        check_record(r, f"{path}: record {i}")
    return records


# --- rows: records of one config averaged over seeds --------------------------------------------


def primary_metric(metrics: Mapping[str, Any]) -> str:
    return next(m for m in PRIMARY_METRICS if m in metrics)


def _identity(config: Mapping[str, Any], drop: Iterable[str]) -> str:
    return json.dumps({k: v for k, v in config.items() if k not in drop}, sort_keys=True, default=str)


def _mean_lists(values: Sequence[Any]) -> list[float]:
    """Element-wise mean of equal-length lists; [] when any is missing or the lengths differ."""
    if not values or any(not isinstance(v, list) for v in values) or len({len(v) for v in values}) != 1:
        return []
    return np.mean(np.asarray(values, dtype=np.float64), axis=0).tolist()


@dataclass(frozen=True)
class Row:
    """One config on one task, averaged over its channel seeds.

    value / stderr: the primary metric and its standard error (the mean of the seeds' errors: the
    seeds score the same items). Latency fields in seconds per request; per_layer_waiting_s [L];
    per_device: name → [U] (tokens, dropped, drop_rate, downlink_s, compute_s, uplink_s, snr_db_*);
    per_request_s: every request's latency when the records carry it (else empty). Outage (None /
    empty for records that predate it): outage_requests / late_requests, the share of requests that
    lost an expert to a link in outage / had a call cut late; lost_calls / late_calls, such events
    per request; link_down_rate, the share of (layer, device) times a link was down;
    per_device_outage: link_down (share of layer times), cut_down / cut_late (calls per request),
    skipped (tokens per request) → [U]. Energy (None / empty likewise): energy_j, J per request of
    all devices; per_device_energy: compute_j / radio_j / energy_j → [U] (J per request)."""

    task: str
    kind: str
    policy: str
    params: tuple[tuple[str, Any], ...]
    top_k: int
    scenario: str
    overrides: tuple[str, ...]
    allocator: str
    seeds: tuple[int, ...]
    n: int
    metric: str
    value: float
    stderr: float | None
    mean_s: float
    p50_s: float
    p95_s: float
    p99_s: float
    drop_rate: float
    retained_mass: float
    group: str  # the config without its seeds: one row per (group, task)
    base_group: str  # the config without seeds and policy: rows sharing it are compared
    per_layer_waiting_s: tuple[float, ...] = ()
    per_device: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    per_request_s: tuple[float, ...] = ()
    outage_requests: float | None = None
    late_requests: float | None = None
    lost_calls: float | None = None
    late_calls: float | None = None
    link_down_rate: float | None = None
    per_device_outage: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    energy_j: float | None = None
    per_device_energy: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    outcomes: str = ""  # each (seed, item)'s 0/1 under acc, seeds in order ("" if a record lacks them)

    @property
    def is_vanilla(self) -> bool:
        return self.policy == "topk" and all(v is None for _, v in self.params)

    @property
    def policy_label(self) -> str:
        return policy_label(self.policy, dict(self.params))

    @property
    def scenario_label(self) -> str:
        shown = [o for o in self.overrides if not o.startswith("model")]
        return self.scenario + (f" ({', '.join(shown)})" if shown else "")

    def label(self, with_scenario: bool = False) -> str:
        """A config's short name in legends: policy · allocator (· scenario)."""
        text = f"{self.policy_label} · {self.allocator}"
        return text + (f" · {self.scenario_label}" if with_scenario else "")


def policy_label(name: str, params: Mapping[str, Any]) -> str:
    """``wdmoe θ=0.1 k-scaled``: θ for theta, a true flag by its name, others as key=value."""
    parts = [name]
    for key, value in sorted(params.items(), key=lambda kv: (kv[0] != "theta", kv[0])):
        if key == "theta":
            parts.append(f"θ={value:g}" if isinstance(value, int | float) else f"θ={value}")
        elif value is True:
            parts.append(key.replace("_", "-"))
        elif value is not None and value is not False:
            parts.append(f"{key}={value}")
    return " ".join(parts)


def make_row(records: Sequence[Mapping[str, Any]]) -> Row:
    """Average the records of one config and task over their seeds."""
    first = records[0]
    cfg, metric = first["config"], primary_metric(first["metrics"])
    lat = [r["latency"] for r in records]
    errs = [r.get("stderr", {}).get(metric) for r in records]
    per_device = _mean_mapping([x.get("per_device") for x in lat])
    per_request = [r.get("per_request_s") for r in lat]
    return Row(
        task=str(first["task"]),
        kind=str(first.get("kind", "")),
        policy=str(cfg["policy"]["name"]),
        params=tuple(sorted(cfg["policy"]["params"].items())),
        top_k=int(cfg["top_k"]),
        scenario=str(cfg["scenario"]["name"]),
        overrides=tuple(cfg["scenario"]["overrides"]),
        allocator=str(cfg["allocator"]),
        seeds=tuple(sorted(int(r["config"]["seeds"]["channel"]) for r in records)),
        n=int(first["n"]),
        metric=metric,
        value=float(np.mean([float(r["metrics"][metric]) for r in records])),
        stderr=None if any(e is None for e in errs) else float(np.mean([float(e) for e in errs])),  # type: ignore[arg-type]
        mean_s=float(np.mean([x["mean_s"] for x in lat])),
        **{key: float(np.mean([x.get(key, math.nan) for x in lat])) for _, key in PERCENTILES},
        drop_rate=float(np.mean([x.get("drop_rate", 0.0) for x in lat])),
        retained_mass=float(np.mean([x.get("retained_mass", 1.0) for x in lat])),
        group=_identity(cfg, ("seeds",)),
        base_group=_identity(cfg, ("seeds", "policy")),
        per_layer_waiting_s=tuple(_mean_lists([(x.get("per_layer") or {}).get("waiting_s") for x in lat])),
        per_device=per_device,
        per_request_s=tuple(v for p in per_request for v in p) if all(per_request) else (),
        outage_requests=_mean_or_none([x.get("outage_requests") for x in lat]),
        late_requests=_mean_or_none([x.get("late_requests") for x in lat]),
        lost_calls=_mean_or_none([x.get("lost_calls") for x in lat]),
        late_calls=_mean_or_none([x.get("late_calls") for x in lat]),
        link_down_rate=_mean_or_none([x.get("link_down_rate") for x in lat]),
        per_device_outage=_mean_mapping([x.get("per_device_outage") for x in lat]),
        energy_j=_mean_or_none([x.get("energy_j") for x in lat]),
        per_device_energy=_mean_mapping([x.get("per_device_energy") for x in lat]),
        outcomes=_outcomes(records) if metric == "acc" else "",
    )


def _outcomes(records: Sequence[Mapping[str, Any]]) -> str:
    """The records' per-item outcomes joined in seed order ("" when any record lacks them)."""
    by_seed = sorted(records, key=lambda r: int(r["config"]["seeds"]["channel"]))
    parts = [(r.get("outcomes") or {}).get("acc") or "" for r in by_seed]
    return "".join(parts) if all(parts) else ""


def _mean_or_none(values: Sequence[Any]) -> float | None:
    """The mean, or None when any record lacks the value (older records)."""
    return None if any(v is None for v in values) else float(np.mean(values))


def _mean_mapping(values: Sequence[Any]) -> dict[str, tuple[float, ...]]:
    """name → the element-wise mean over records of their lists [U] (names of the first record;
    {} when the first lacks the mapping)."""
    first = values[0] if values and isinstance(values[0], Mapping) else {}
    return {
        name: tuple(_mean_lists([v.get(name) if isinstance(v, Mapping) else None for v in values]))
        for name in first
    }


def make_rows(records: Sequence[Mapping[str, Any]]) -> list[Row]:
    """One row per (config without seeds, task); a record repeated under one key counts once
    (the last one wins). Tasks keep the order they first appear in; within a task rows go by
    scenario, top-k, allocator, then policy (topk first) and parameters."""
    unique = {str(r.get("key", i)): r for i, r in enumerate(records)}
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for r in unique.values():
        groups.setdefault((str(r["task"]), _identity(r["config"], ("seeds",))), []).append(r)
    rows = [make_row(g) for g in groups.values()]
    tasks = {task: i for i, task in enumerate(dict.fromkeys(str(r["task"]) for r in records))}
    return sorted(rows, key=lambda row: (tasks[row.task], *_order(row)))


def _order(row: Row) -> tuple:
    params = json.dumps(row.params, default=str)
    return (row.scenario_label, row.top_k, row.allocator, not row.is_vanilla, row.policy, params)


# --- comparisons --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    """A row against its vanilla baseline: ×speed-up, relative reduction, metric change."""

    speedup: float
    reduction: float
    speedup_p50: float
    delta: float  # in points (×100) for accuracies, in the metric's units for perplexities
    delta_se: float | None = None  # its paired standard error (points), where both have outcomes


def baseline(row: Row, rows: Sequence[Row]) -> Row | None:
    """The vanilla topk row of the same task, config (but the policy) and seeds."""
    for other in rows:
        if (
            other.is_vanilla
            and other.task == row.task
            and other.base_group == row.base_group
            and other.seeds == row.seeds
        ):
            return other
    return None


def compare(row: Row, base: Row) -> Comparison:
    scale = 1.0 if row.metric in LOWER_IS_BETTER else 100.0
    return Comparison(
        speedup=base.mean_s / row.mean_s if row.mean_s > 0 else math.inf,
        reduction=1.0 - row.mean_s / base.mean_s if base.mean_s > 0 else 0.0,
        speedup_p50=base.p50_s / row.p50_s if row.p50_s > 0 else math.inf,
        delta=(row.value - base.value) * scale,
        delta_se=None if row is base else paired_se(base.outcomes, row.outcomes),
    )


def paired_se(base: str, other: str) -> float | None:
    """The paired stderr (points) of other − base accuracy on the same (seed, item)s, or None."""
    if not base or len(base) != len(other):
        return None
    return 100 * paired_difference(base, other)[1]


def pareto_front(latency_s: Sequence[float], quality: Sequence[float]) -> list[bool]:
    """Which points are on the Pareto front of (lower latency, higher quality): not dominated by
    a point at most as slow and at least as good, and strictly better in one of the two."""
    lat, q = np.asarray(latency_s, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    front = []
    for i in range(len(lat)):
        dominated = (lat <= lat[i]) & (q >= q[i]) & ((lat < lat[i]) | (q > q[i]))
        front.append(not bool(dominated.any()))
    return front


def quality(row: Row) -> float:
    """The row's metric oriented so that higher is better."""
    return -row.value if row.metric in LOWER_IS_BETTER else row.value


def fronts(rows: Sequence[Row]) -> dict[int, bool]:
    """Per task and policy name, whether each row (by index) is on that policy's Pareto front."""
    out: dict[int, bool] = {}
    groups: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault((r.task, r.policy), []).append(i)
    for idx in groups.values():
        flags = pareto_front([rows[i].mean_s for i in idx], [quality(rows[i]) for i in idx])
        out.update(zip(idx, flags, strict=True))
    return out


@dataclass(frozen=True)
class Highlight:
    """The terminal summary of one task: vanilla latency and the best speed-up among the rest."""

    task: str
    configs: int
    vanilla_s: float | None
    best: str | None
    speedup: float | None
    delta: float | None


def highlights(rows: Sequence[Row]) -> list[Highlight]:
    out = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        pairs = [(r, b) for r in task_rows if not r.is_vanilla and (b := baseline(r, rows)) is not None]
        vanilla = next((r for r in task_rows if r.is_vanilla), None)
        if pairs:
            row, base = max(pairs, key=lambda p: compare(*p).speedup)
            c = compare(row, base)
            out.append(Highlight(task, len(task_rows), base.mean_s, row.label(), c.speedup, c.delta))
        else:
            out.append(Highlight(task, len(task_rows), vanilla.mean_s if vanilla else None, None, None, None))
    return out

"""Reports over evaluation records (pure functions, no model code): Markdown tables and plots.

Input: the JSON Lines records of `wdmoe eval` / `wdmoe reproduce` (schema:
:func:`wdmoe.eval.results.make_record`). Records that differ only in their channel seed are one
*row*: metrics and latency are averaged over the seeds, and the seed count is shown. Each row is
compared with its *baseline*, the vanilla ``topk`` row with everything else equal (task, model,
top-k, scenario and its overrides — e.g. the bandwidth —, allocator, seeds, limit):

    speed-up   = mean_s(topk) / mean_s(row)                (×, > 1: faster than vanilla)
    p50 speed-up = p50_s(topk) / p50_s(row)                (robust to the deep-fade tail)
    reduction  = 1 − mean_s(row) / mean_s(topk)            (relative latency reduction)
    Δ metric   = metric(row) − metric(topk)                (points ×100 for accuracies)

Latency is per request (one scored sequence, or one GSM8K question with its decode steps).
"""

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from wdmoe.errors import ConfigError
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
PLOT_NAMES = (
    "accuracy_vs_latency.png",
    "latency_cdf.png",
    "per_layer_waiting.png",
    "per_device_breakdown.png",
    "drop_vs_snr.png",
)


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
    per_request_s: every request's latency when the records carry it (else empty).
    """

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
    per_device = {
        name: tuple(_mean_lists([r.get("per_device", {}).get(name) for r in lat]))
        for name in (lat[0].get("per_device") or {})
    }
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
    )


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
    )


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


# --- Markdown -----------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    return "–" if not math.isfinite(seconds) else f"{seconds:.4g}"


def fmt_metric(row: Row) -> str:
    scale, digits = (1.0, 2) if row.metric in LOWER_IS_BETTER else (100.0, 1)
    value = f"{row.value * scale:.{digits}f}"
    return value if row.stderr is None else f"{value} ± {row.stderr * scale:.{digits}f}"


def fmt_seeds(seeds: Sequence[int]) -> str:
    return ",".join(map(str, seeds)) if len(seeds) == 1 else f"{','.join(map(str, seeds))} (×{len(seeds)})"


TABLE_HEADER = (
    "policy",
    "top-k",
    "allocator",
    "scenario",
    "seed(s)",
    "n",
    "{metric}",
    "mean s",
    "p50 s",
    "p95 s",
    "speed-up",
    "p50 speed-up",
    "latency −%",
    "Δ{name}{delta_unit}",
    "drop rate",
    "retained mass",
)


def table_cells(row: Row, comparison: Comparison | None, on_front: bool) -> list[str]:
    c = comparison
    delta = "–" if c is None else f"{c.delta:+.2f}" if row.metric in LOWER_IS_BETTER else f"{c.delta:+.1f}"
    return [
        row.policy_label + (" ◆" if on_front else ""),
        str(row.top_k),
        row.allocator,
        row.scenario_label,
        fmt_seeds(row.seeds),
        str(row.n),
        fmt_metric(row),
        fmt_s(row.mean_s),
        fmt_s(row.p50_s),
        fmt_s(row.p95_s),
        "–" if c is None else f"{c.speedup:.2f}×",
        "–" if c is None else f"{c.speedup_p50:.2f}×",
        "–" if c is None else f"{c.reduction * 100:.1f}",
        delta,
        f"{row.drop_rate:.3f}",
        f"{row.retained_mass:.3f}",
    ]


def task_table(task_rows: Sequence[Row], all_rows: Sequence[Row], front: Mapping[int, bool]) -> str:
    """One Markdown table for the rows of one task (``front`` indexed like ``all_rows``)."""
    first = task_rows[0]
    lower = first.metric in LOWER_IS_BETTER
    header = [
        h.format(
            metric=first.metric + ("" if lower else " %"),
            name=first.metric,
            delta_unit="" if lower else " pts",
        )
        for h in TABLE_HEADER
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in task_rows:
        base = baseline(row, all_rows)
        comparison = None if base is None else compare(row, base)
        on_front = front.get(next(i for i, r in enumerate(all_rows) if r is row), False)
        lines.append("| " + " | ".join(table_cells(row, comparison, on_front)) + " |")
    return "\n".join(lines)


def render_tables(rows: Sequence[Row], heading: str = "###") -> str:
    """A Markdown section per task with its table."""
    front = fronts(rows)
    parts = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        parts.append(f"{heading} {task} ({task_rows[0].kind or 'task'}, {task_rows[0].metric})\n")
        parts.append(task_table(task_rows, rows, front) + "\n")
    return "\n".join(parts)


NOTES = """\
Latency is simulated per request (one scored sequence; GSM8K: one question, prefill + decode),
in seconds. speed-up = mean latency of vanilla topk ÷ the row's; latency −% = the relative
reduction; Δ = the metric's change against topk (points for accuracies). The baseline is the topk
row with the same task, model, top-k, scenario overrides (bandwidth …), allocator and seeds; "–"
when there is none. Rows of several seeds are averaged (×count shown; ± is then the mean standard
error, as the seeds score the same items). ◆ marks the Pareto front (latency vs metric) of each
policy within a task. p50 speed-up compares medians: under Rayleigh fading E[1/|g|²] is infinite,
so a channel-blind policy's mean latency is ruled by the rare deep fades a run happens to hit (a
device 50 dB down must still be waited for); read the mean and the median together."""


def render_markdown(
    rows: Sequence[Row], plots: Sequence[Path] = (), title: str | None = "wdmoe report"
) -> str:
    """The whole report: tables per task, notes, then the plots (paths relative to the report)."""
    configs = len({r.group for r in rows})
    head = [] if title is None else [f"# {title}\n"]
    head.append(f"{len(rows)} rows: {configs} configs on {len({r.task for r in rows})} tasks.\n")
    images = [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join([*head, render_tables(rows), NOTES, "", *images, ""])


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


# --- plots ------------------------------------------------------------------------------------


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(
    plt: Any, panels: int, width: float = 4.6, height: float = 3.6, sharey: bool = False
) -> tuple[Any, list[Any]]:
    cols = min(panels, 3)
    rows = math.ceil(panels / cols)
    size = (width * cols, height * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False, sharey=sharey)
    flat = list(axes.flat)
    for ax in flat[panels:]:
        ax.set_visible(False)
    return fig, flat[:panels]


def _save(plt: Any, fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tasks(rows: Sequence[Row]) -> list[str]:
    return list(dict.fromkeys(r.task for r in rows))


def _many_scenarios(rows: Sequence[Row]) -> bool:
    return len({r.scenario_label for r in rows}) > 1


def plot_accuracy_latency(rows: Sequence[Row], path: Path) -> Path:
    """Per task: the metric against mean latency, one colour per policy, its Pareto front joined."""
    plt = _pyplot()
    tasks = _tasks(rows)
    fig, axes = _grid(plt, len(tasks))
    front = fronts(rows)
    policies = list(dict.fromkeys(r.policy for r in rows))
    colours = {p: f"C{i % 10}" for i, p in enumerate(policies)}
    markers = {a: m for a, m in zip(dict.fromkeys(r.allocator for r in rows), "os^Dv<>", strict=False)}
    for ax, task in zip(axes, tasks, strict=True):
        for policy in policies:
            idx = [i for i, r in enumerate(rows) if r.task == task and r.policy == policy]
            for i in idx:  # every point; the front's points named by their parameters
                r = rows[i]
                ax.scatter(r.mean_s, r.value, c=colours[policy], marker=markers.get(r.allocator, "o"))
                if front[i]:
                    ax.annotate(r.policy_label.removeprefix(policy).strip(), (r.mean_s, r.value), fontsize=6)
            on = sorted((rows[i] for i in idx if front[i]), key=lambda r: r.mean_s)
            if on:
                xs, ys = [r.mean_s for r in on], [r.value for r in on]
                ax.plot(xs, ys, c=colours[policy], lw=1, label=f"{policy} (front)")
        ax.set(title=task, xlabel="mean latency per request (s)", ylabel=rows[0].metric)
        ax.legend(fontsize=7, title=" · ".join(f"{m} {a}" for a, m in markers.items()), title_fontsize=7)
    return _save(plt, fig, path)


def plot_latency_cdf(rows: Sequence[Row], path: Path) -> Path:
    """Per task: each config's per-request latency CDF, or its p50/p95/p99 points when the records
    keep percentiles only."""
    plt = _pyplot()
    tasks = _tasks(rows)
    fig, axes = _grid(plt, len(tasks))
    with_scenario = _many_scenarios(rows)
    for ax, task in zip(axes, tasks, strict=True):
        exact = True
        for r in (r for r in rows if r.task == task):
            if r.per_request_s:
                xs = np.sort(np.asarray(r.per_request_s))
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=r.label(with_scenario))
            else:
                exact = False
                xs = np.array([getattr(r, key) for _, key in PERCENTILES])
                ax.plot(xs, [q / 100 for q, _ in PERCENTILES], marker="o", label=r.label(with_scenario))
        kind = "CDF" if exact else "p50 / p95 / p99"
        ax.set(title=f"{task}: latency {kind}", xlabel="latency per request (s)", ylabel="fraction ≤ x")
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def plot_per_layer_waiting(rows: Sequence[Row], path: Path) -> Path:
    """Per task: the attention-waiting latency T_l of each MoE layer (s per request), per config."""
    plt = _pyplot()
    tasks = _tasks(rows)
    fig, axes = _grid(plt, len(tasks))
    with_scenario = _many_scenarios(rows)
    for ax, task in zip(axes, tasks, strict=True):
        for r in (r for r in rows if r.task == task and r.per_layer_waiting_s):
            ax.plot(np.asarray(r.per_layer_waiting_s), marker=".", label=r.label(with_scenario))
        ax.set(title=f"{task}: waiting per layer", xlabel="MoE layer", ylabel="s per request")
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def by_config(rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Rows grouped by their config label (over tasks), in row order."""
    with_scenario = _many_scenarios(rows)
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r.label(with_scenario), []).append(r)
    return groups


def device_mean(rows: Sequence[Row], name: str) -> np.ndarray:
    """The mean over ``rows`` (tasks) of a per-device quantity [U]; empty when none has it."""
    values = [r.per_device[name] for r in rows if r.per_device.get(name)]
    return np.mean(np.asarray(values, dtype=np.float64), axis=0) if values else np.zeros(0)


def plot_device_breakdown(rows: Sequence[Row], path: Path) -> Path:
    """Per config (mean over tasks): each device's downlink / compute / uplink seconds per request,
    stacked."""
    plt = _pyplot()
    groups = by_config(rows)
    fig, axes = _grid(plt, len(groups), width=4.2, height=3.2, sharey=True)
    for ax, (label, group) in zip(axes, groups.items(), strict=True):
        bottom: np.ndarray | None = None
        for part, colour in (("downlink_s", "C0"), ("compute_s", "C2"), ("uplink_s", "C3")):
            sec = device_mean(group, part)
            if sec.size:
                ax.bar(np.arange(sec.size), sec, bottom=bottom, color=colour, label=part.removesuffix("_s"))
                bottom = sec if bottom is None else bottom + sec
        ax.set(title=label, xlabel="device", ylabel="s per request (Σ layers)")
        ax.title.set_fontsize(8)
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def plot_drop_vs_snr(rows: Sequence[Row], path: Path) -> Path:
    """Per config (mean over tasks): each device's drop rate against its mean uplink SNR at B/U."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, group in by_config(rows).items():
        snr, drop = device_mean(group, "snr_db_ul"), device_mean(group, "drop_rate")
        if snr.size and snr.size == drop.size:
            ax.scatter(snr, drop, label=label, s=22)
    ax.set(
        title="expert drops per device against its channel",
        xlabel="mean uplink SNR at an equal share B/U (dB)",
        ylabel="drop rate (dropped / candidate tokens)",
    )
    ax.legend(fontsize=6)
    return _save(plt, fig, path)


def write_plots(rows: Sequence[Row], folder: Path) -> list[Path]:
    """Every plot of the report as a PNG in ``folder`` (names: :data:`PLOT_NAMES`)."""
    folder = Path(folder)
    makers = (
        plot_accuracy_latency,
        plot_latency_cdf,
        plot_per_layer_waiting,
        plot_device_breakdown,
        plot_drop_vs_snr,
    )
    return [make(rows, folder / name) for make, name in zip(makers, PLOT_NAMES, strict=True)]


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote."""

    markdown: Path
    plots: tuple[Path, ...]
    rows: tuple[Row, ...]


def write_report(records: Sequence[Mapping[str, Any]], folder: Path, title: str = "wdmoe report") -> Report:
    """``folder/report.md`` with a table per task, and the plots beside it."""
    if not records:
        raise ConfigError("no records to report on")
    rows = make_rows(records)
    folder = Path(folder)
    plots = write_plots(rows, folder)
    markdown = folder / "report.md"
    markdown.write_text(render_markdown(rows, plots, title), encoding="utf-8")
    return Report(markdown, tuple(plots), tuple(rows))

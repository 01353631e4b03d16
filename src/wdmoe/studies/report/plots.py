"""Report plots (PNG, matplotlib's Agg backend): accuracy against latency with Pareto fronts,
latency CDFs (log time axis), waiting per layer, per-device time breakdown with each link's
outage, drops against SNR."""

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from wdmoe.studies.report.rows import PERCENTILES, Row, fronts

PLOT_NAMES = (
    "accuracy_vs_latency.png",
    "latency_cdf.png",
    "per_layer_waiting.png",
    "per_device_breakdown.png",
    "drop_vs_snr.png",
)


SPREAD_FOR_LOG = 20.0  # a device panel turns logarithmic when its slowest device is this × the median


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _grid(
    plt: Any, panels: int, width: float = 4.6, height: float = 3.6, cols: int = 3
) -> tuple[Any, list[Any]]:
    cols = min(panels, cols)
    rows = math.ceil(panels / cols)
    size = (width * cols, height * rows)
    fig, axes = plt.subplots(rows, cols, figsize=size, squeeze=False)
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
        exact, positive = True, True
        for r in (r for r in rows if r.task == task):
            if r.per_request_s:
                xs = np.sort(np.asarray(r.per_request_s))
                ax.step(xs, np.arange(1, len(xs) + 1) / len(xs), where="post", label=r.label(with_scenario))
            else:
                exact = False
                xs = np.array([getattr(r, key) for _, key in PERCENTILES])
                ax.plot(xs, [q / 100 for q, _ in PERCENTILES], marker="o", label=r.label(with_scenario))
            positive = positive and bool(np.all(xs[np.isfinite(xs)] > 0))
        if positive:  # latencies span decades (a deep fade's tail): a log axis keeps the body visible
            _log_axis(ax, "x")
        kind = "CDF" if exact else "p50 / p95 / p99"
        ax.set(title=f"{task}: latency {kind}", xlabel="latency per request (s)", ylabel="fraction ≤ x")
        ax.legend(fontsize=6)
    return _save(plt, fig, path)


def _log_axis(ax: Any, which: str) -> None:
    """A log scale on the ``which`` ("x" or "y") axis, labelled in plain numbers (0.5, 1, 2 …
    rather than 5×10⁻¹)."""
    from matplotlib.ticker import LogFormatter

    class Plain(LogFormatter):  # LogFormatter's choice of ticks to label, as plain numbers
        def __call__(self, x: float, pos: int | None = None) -> str:
            return f"{x:g}" if super().__call__(x, pos) else ""

    getattr(ax, f"set_{which}scale")("log")
    axis = getattr(ax, f"{which}axis")
    axis.set_major_formatter(Plain())
    axis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1.5, 0.5)))


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


def device_mean(rows: Sequence[Row], name: str, outage: bool = False) -> np.ndarray:
    """The mean over ``rows`` (tasks) of a per-device quantity [U] (``outage``: of
    ``per_device_outage``); empty when none has it."""
    values = [v for r in rows if (v := (r.per_device_outage if outage else r.per_device).get(name))]
    return np.mean(np.asarray(values, dtype=np.float64), axis=0) if values else np.zeros(0)


def _device_times(ax: Any, row: Row) -> None:
    """Each device's downlink / compute / uplink seconds per request, stacked; a log axis when one
    device is far slower than the rest (so that the others stay visible)."""
    total: np.ndarray | None = None
    for part, colour in (("downlink_s", "C0"), ("compute_s", "C2"), ("uplink_s", "C3")):
        sec = device_mean([row], part)
        if sec.size:
            ax.bar(np.arange(sec.size), sec, bottom=total, color=colour, label=part.removesuffix("_s"))
            total = sec if total is None else total + sec
    ax.set_ylabel("s per request (Σ layers)", fontsize=7)
    if total is None:
        return
    ax.set_xticks(np.arange(total.size))
    busy = total[total > 0]
    if busy.size > 1 and busy.max() > SPREAD_FOR_LOG * np.median(busy):
        _log_axis(ax, "y")
        ax.set_ylabel("s per request (Σ layers, log)", fontsize=7)


def _link_down_marks(ax: Any, row: Row) -> list[Any]:
    """The share of layer times each device's link was down, as markers on a twin axis (%)."""
    down = device_mean([row], "link_down", outage=True)
    if not down.size:
        return []
    twin = ax.twinx()
    marks = twin.plot(np.arange(down.size), down * 100, "kv", ms=5, label="link down %")
    twin.set_ylim(0, max(5.0, float(down.max()) * 100 * 1.2))
    twin.set_ylabel("link down (% of layer times)", fontsize=6)
    twin.tick_params(labelsize=6)
    return list(marks)


def device_panel(ax: Any, row: Row, title: str, legend: bool) -> None:
    """One row's devices on their own y axis: times stacked, link outage on a twin axis."""
    _device_times(ax, row)
    marks = _link_down_marks(ax, row)
    ax.set_title(title, fontsize=7)
    ax.set_xlabel("device", fontsize=7)
    ax.tick_params(labelsize=6)
    handles, labels = ax.get_legend_handles_labels()
    if legend and handles + marks:
        ax.legend([*handles, *marks], [*labels, *(m.get_label() for m in marks)], fontsize=5)


def plot_device_breakdown(rows: Sequence[Row], path: Path) -> Path:
    """One panel per row (task · config), each on its own y axis — one device's deep fade on one
    row must not flatten the others: each device's downlink / compute / uplink seconds per request,
    stacked, and its link's outage (share of layer times down) as a marker on a twin axis."""
    plt = _pyplot()
    with_scenario = _many_scenarios(rows)
    cols = max(3, math.ceil(math.sqrt(1.5 * len(rows))))
    fig, axes = _grid(plt, len(rows), width=3.0, height=2.4, cols=cols)
    for i, (ax, row) in enumerate(zip(axes, rows, strict=True)):
        device_panel(ax, row, f"{row.task} · {row.label(with_scenario)}", legend=i == 0)
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

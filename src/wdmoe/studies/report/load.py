"""The report's "Latency under load" section, from the records of `wdmoe load` (``load*.jsonl``
beside the results file): a table per face (simulator, runtime) with TTFT / TPOT percentiles,
throughput and drop rate per arrival rate λ, and two figures against λ — latency percentiles, and
throughput with the drop rate — with n, the configuration and the seed under them."""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from wdmoe.serving.load import PERCENTILES, LoadRecord, group_runs, summarize
from wdmoe.studies.load_io import is_load_file
from wdmoe.studies.report.plots import _pyplot, _save

LOAD_PLOT_NAMES = ("load_latency.png", "load_throughput.png")
FACE_NAMES = {"sim": "simulator", "runtime": "runtime (a running BS)"}
SPREAD_FOR_LOG = 10.0  # a latency panel turns logarithmic when its largest value is this × its smallest
LOAD_NOTES = """\
TTFT: time to first token, from a request's arrival (queueing included). TPOT: time per output
token after the first, (finish − arrival − TTFT) / (tokens − 1). Percentiles over the completed
requests (numpy, linear). Throughput: output tokens (and completed requests) per second over the
span from the first arrival to the last finish. refused: turned away by a full BS; failed: any
other error; dropped experts / req: expert calls dropped per completed request. The simulator's
seconds are simulated, the runtime's are wall seconds. A trace's rate is its arrivals' rate."""


def find_load_files(results: Path) -> list[Path]:
    """The load results to report beside ``results``: ``load*.jsonl`` in its folder (or in it, if a
    folder), and ``results`` itself when it holds load records."""
    results = Path(results)
    folder = results if results.is_dir() else results.parent
    found = [p for p in sorted(folder.glob("load*.jsonl")) if p.is_file() and is_load_file(p)]
    if results.is_file() and results not in found and is_load_file(results):
        found.append(results)
    return found


def x_of(summary: Mapping[str, Any]) -> float:
    """Where a run sits on the λ axis: its λ, or a trace's offered rate (requests/s)."""
    rate = summary["rate_per_s"]
    return float(summary["offered_rps"] if rate is None else rate)


def fmt_ms(seconds: float) -> str:
    return "–" if not math.isfinite(seconds) else f"{1e3 * seconds:.1f}"


def fmt_num(value: float, digits: int = 2) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


LOAD_HEADER = (
    "λ /s",
    "n",
    "completed",
    "refused %",
    "failed %",
    *(f"TTFT p{p} ms" for p in PERCENTILES),
    *(f"TPOT p{p} ms" for p in PERCENTILES),
    "tokens/s",
    "requests/s",
    "dropped experts / req",
)


def load_cells(s: Mapping[str, Any]) -> list[str]:
    rate = "trace" if s["rate_per_s"] is None else f"{s['rate_per_s']:g}"
    offered = f" ({fmt_num(s['offered_rps'])})" if s["rate_per_s"] is None else ""
    return [
        rate + offered,
        str(s["n"]),
        str(s["completed"]),
        f"{100 * s['refused'] / s['n']:.1f}",
        f"{100 * s['failed'] / s['n']:.1f}",
        *(fmt_ms(s[f"ttft_p{p}"]) for p in PERCENTILES),
        *(fmt_ms(s[f"tpot_p{p}"]) for p in PERCENTILES),
        fmt_num(s["tokens_per_s"]),
        fmt_num(s["requests_per_s"], 3),
        fmt_num(s["dropped_experts_mean"]),
    ]


def load_table(summaries: Sequence[Mapping[str, Any]]) -> str:
    """A Markdown table, one row per run (λ) of one face."""
    lines = ["| " + " | ".join(LOAD_HEADER) + " |", "|" + "---|" * len(LOAD_HEADER)]
    lines += ["| " + " | ".join(load_cells(s)) + " |" for s in summaries]
    return "\n".join(lines)


def describe_config(records: Sequence[LoadRecord]) -> str:
    """The distinct configurations of a face's records as ``key=value`` lists ("; " between)."""
    seen: list[str] = []
    for r in records:
        text = " · ".join(f"{k}={v}" for k, v in sorted(r.config.items()) if v is not None)
        if text not in seen:
            seen.append(text)
    return "; ".join(t or "not recorded" for t in seen)


def _series(summaries: Sequence[Mapping[str, Any]]) -> list[tuple[str, str]]:
    """The (face, configuration) series of the summaries, in their order."""
    return list(dict.fromkeys(s["series"] for s in summaries))


def series_label(records: Sequence[LoadRecord]) -> str:
    """A short name for a series' legend: its face and what sets it apart (policy, θ, allocator,
    scenario or BS)."""
    c, face = records[0].config, records[0].face
    params = c.get("params") or {}
    theta = f" θ={params['theta']}" if isinstance(params, Mapping) and "theta" in params else ""
    where = c.get("scenario") or c.get("bs") or ""
    parts = [str(c.get("policy", "")) + theta, str(c.get("allocator", "")), str(where)]
    return f"{face}: " + " · ".join(p for p in parts if p) if any(parts) else face


def _spread(values: Sequence[float]) -> bool:
    positive = [v for v in values if math.isfinite(v) and v > 0]
    return bool(positive) and max(positive) > SPREAD_FOR_LOG * min(positive)


def _rate_axis(ax: Any, summaries: Sequence[Mapping[str, Any]]) -> None:
    """λ on a log2 axis when the rates span more than SPREAD_FOR_LOG× (rates usually double)."""
    ax.set_xlabel("λ (requests/s)")
    if _spread([x_of(s) for s in summaries]):
        from matplotlib.ticker import FuncFormatter

        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))  # 0.5, 1, 2 (not 2^-1)


def caption(summaries: Sequence[Mapping[str, Any]]) -> str:
    """n per run and the seeds, for a figure's title: "n = 20 per rate · seed 0"."""
    ns = ", ".join(map(str, sorted({s["n"] for s in summaries})))
    seeds = sorted({str(seed) for s in summaries for seed in s.get("seeds", ())})
    return f"n = {ns} per rate" + (f" · seed {', '.join(seeds)}" if seeds else "")


def plot_load_latency(summaries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Two panels, TTFT and TPOT (ms) against λ: one colour per face, one line style per
    percentile (p50 solid, p95 dashed, p99 dotted); log y when the values spread widely."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10.0, 4.0))
    styles = dict(zip(PERCENTILES, ("-", "--", ":"), strict=True))
    for ax, metric in zip(axes, ("ttft", "tpot"), strict=True):
        values: list[float] = []
        for i, series in enumerate(_series(summaries)):
            runs = sorted((s for s in summaries if s["series"] == series), key=x_of)
            for p in PERCENTILES:
                ys = [1e3 * s[f"{metric}_p{p}"] for s in runs]
                values += ys
                name = f"{runs[0]['label']} p{p}"
                ax.plot([x_of(s) for s in runs], ys, styles[p], marker="o", color=f"C{i}", label=name)
        if _spread(values):
            ax.set_yscale("log")
        _rate_axis(ax, summaries)
        ax.set(title=f"{metric.upper()} against the arrival rate", ylabel="ms")
        ax.legend(fontsize=6)
    fig.suptitle(caption(summaries), fontsize=8)
    return _save(plt, fig, path)


def plot_load_throughput(summaries: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Output tokens/s against λ (solid, left axis) and the drop rate (refused + failed share of
    requests, dashed, right axis), one colour per face."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    drops = ax.twinx()
    for i, series in enumerate(_series(summaries)):
        runs = sorted((s for s in summaries if s["series"] == series), key=x_of)
        xs, name = [x_of(s) for s in runs], runs[0]["label"]
        ax.plot(
            xs, [s["tokens_per_s"] for s in runs], "-", marker="o", color=f"C{i}", label=f"{name} tokens/s"
        )
        drops.plot(xs, [s["drop_rate"] for s in runs], "--", marker="x", color=f"C{i}", label=f"{name} drops")
    ax.set_title(f"throughput and drop rate against the arrival rate\n{caption(summaries)}", fontsize=9)
    _rate_axis(ax, summaries)
    ax.set_ylabel("output tokens/s")
    drops.set_ylabel("drop rate (refused + failed) / n")
    drops.set_ylim(-0.02, 1.02)
    handles = [*ax.get_legend_handles_labels()[0], *drops.get_legend_handles_labels()[0]]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=6, loc="upper left")
    return _save(plt, fig, path)


def render_load_section(
    records: Sequence[LoadRecord], plots: Sequence[Path] = (), heading: str = "##"
) -> str:
    """The section: per face, its table and what produced it (n per λ, configuration, seed); then
    the notes and the figures (paths relative to the report)."""
    groups = group_runs(records)
    parts = [f"{heading} Latency under load\n"]
    for series in dict.fromkeys(k[:2] for k in groups):
        runs = {k: rs for k, rs in groups.items() if k[:2] == series}
        ns = sorted({len(rs) for rs in runs.values()})
        first = next(iter(runs.values()))
        parts.append(f"{heading}# {FACE_NAMES[series[0]]} · {series_label(first).split(': ', 1)[-1]}\n")
        parts.append(load_table([summarize(rs) for rs in runs.values()]) + "\n")
        config = describe_config([r for rs in runs.values() for r in rs])
        parts.append(f"n = {', '.join(map(str, ns))} requests per rate; configuration: {config}\n")
    parts += [LOAD_NOTES, "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    return "\n".join(parts)


def run_summary(records: Sequence[LoadRecord]) -> dict[str, Any]:
    """:func:`summarize` of one run, with the seeds its records name ("seeds")."""
    seeds = {r.config["seed"] for r in records if r.config.get("seed") is not None}
    return summarize(records) | {
        "seeds": sorted(seeds),
        "series": records[0].series,
        "label": series_label(records),
    }


def write_load_section(records: Sequence[LoadRecord], folder: Path) -> tuple[str, list[Path]]:
    """The section's Markdown and its two PNGs, written to ``folder`` (:data:`LOAD_PLOT_NAMES`)."""
    summaries = [run_summary(rs) for rs in group_runs(records).values()]
    folder = Path(folder)
    plots = [
        plot_load_latency(summaries, folder / LOAD_PLOT_NAMES[0]),
        plot_load_throughput(summaries, folder / LOAD_PLOT_NAMES[1]),
    ]
    return render_load_section(records, plots), plots

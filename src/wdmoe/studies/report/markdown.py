"""Report Markdown: a table per task (metric, latency percentiles, ×speed-up, Δmetric against
vanilla topk, Pareto front) and the notes that say how to read it."""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from wdmoe.studies.report.rows import LOWER_IS_BETTER, Comparison, Row, baseline, compare, fronts


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

"""Report Markdown: a table per task (metric, latency percentiles, ×speed-up, Δmetric against
vanilla topk, Pareto front, the devices' energy per request, what outage and deadlines did), a
note under it for each heavy-tailed row (mean/p50 above
:data:`~wdmoe.studies.report.rows.HEAVY_TAIL_RATIO`) and the notes that say how to read it."""

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

from wdmoe.latency.deadline import LOWEST_CQI_SE_BPS_PER_HZ
from wdmoe.studies.report.rows import (
    HEAVY_TAIL_RATIO,
    LOWER_IS_BETTER,
    Comparison,
    Row,
    baseline,
    compare,
    fronts,
)
from wdmoe.studies.report.tails import heavy_tailed, slowest_device, tail_ratio, worst_link


def fmt_s(seconds: float) -> str:
    return "–" if not math.isfinite(seconds) else f"{seconds:.4g}"


def fmt_metric(row: Row) -> str:
    scale, digits = (1.0, 2) if row.metric in LOWER_IS_BETTER else (100.0, 1)
    value = f"{row.value * scale:.{digits}f}"
    return value if row.stderr is None else f"{value} ± {row.stderr * scale:.{digits}f}"


def fmt_pct(share: float | None) -> str:
    """A share as a percentage with the digits it needs: 12 %, 9.1 %, 0.41 % ("–" when unknown)."""
    if share is None or not math.isfinite(share):
        return "–"
    pct = share * 100
    digits = 0 if pct >= 10 or pct == 0 else 1 if pct >= 1 else 2
    return f"{pct:.{digits}f} %"


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
    "energy J/req",
    "outage req %",
    "late req %",
)


def table_cells(row: Row, comparison: Comparison | None, on_front: bool) -> list[str]:
    c = comparison
    delta = "–" if c is None else f"{c.delta:+.2f}" if row.metric in LOWER_IS_BETTER else f"{c.delta:+.1f}"
    if c is not None and c.delta_se is not None:
        delta += f" ± {c.delta_se:.1f}"  # paired by (seed, item): what the two runs answered differently
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
        "–" if row.energy_j is None else fmt_s(row.energy_j),
        "–" if row.outage_requests is None else f"{row.outage_requests * 100:.1f}",
        "–" if row.late_requests is None else f"{row.late_requests * 100:.1f}",
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


def tail_numbers(row: Row) -> str:
    """What a heavy tail without known outage looks like: percentiles, the slowest request, late
    calls, and the device that takes longest."""
    text = f"p50 {fmt_s(row.p50_s)} s, p95 {fmt_s(row.p95_s)} s, p99 {fmt_s(row.p99_s)} s"
    if row.per_request_s:
        text += f", slowest {fmt_s(max(row.per_request_s))} s of {len(row.per_request_s)} requests"
    if row.late_requests:
        text += f"; {fmt_pct(row.late_requests)} of requests had a call cut late"
    slowest = slowest_device(row)
    if slowest is not None:
        u, seconds = slowest
        text += f"; device {u} takes longest ({fmt_s(seconds)} s per request, Σ layers)"
    return text


def tail_note(row: Row, label: str | None = None) -> str | None:
    """None unless the row is heavy-tailed; else its mean/p50 and the outage that goes with it —
    requests that lost an expert to outage, the device whose link was down most — or, without
    outage (or for a record that predates outage), what the tail's numbers are."""
    if not heavy_tailed(row):
        return None
    head = f"{label or row.label()}: mean/p50 = {tail_ratio(row):.1f} — "
    if row.outage_requests is None:
        return head + f"heavy tail, outage not recorded (an older record): {tail_numbers(row)}"
    if row.outage_requests <= 0:
        return head + f"heavy tail without outage: {tail_numbers(row)}"
    text = f"{fmt_pct(row.outage_requests)} of requests lost an expert to outage"
    worst = worst_link(row)
    if worst is not None:
        text += f"; device {worst[0]}'s link was down {fmt_pct(worst[1])} of the time"
    if row.late_requests:
        text += f"; {fmt_pct(row.late_requests)} had a call cut late"
    return head + text


def tail_notes(task_rows: Sequence[Row]) -> str:
    """The notes under a task's table, one line per heavy-tailed row ("" when none is)."""
    with_scenario = len({r.scenario_label for r in task_rows}) > 1
    notes = [n for r in task_rows if (n := tail_note(r, r.label(with_scenario))) is not None]
    if not notes:
        return ""
    head = f"Heavy tails (mean/p50 > {HEAVY_TAIL_RATIO:g}):"
    return "\n".join([head, "", *(f"- {n}" for n in notes)]) + "\n"


def render_tables(rows: Sequence[Row], heading: str = "###") -> str:
    """A Markdown section per task with its table and the notes on its heavy-tailed rows."""
    front = fronts(rows)
    parts = []
    for task in dict.fromkeys(r.task for r in rows):
        task_rows = [r for r in rows if r.task == task]
        parts.append(f"{heading} {task} ({task_rows[0].kind or 'task'}, {task_rows[0].metric})\n")
        parts.append(task_table(task_rows, rows, front) + "\n")
        if notes := tail_notes(task_rows):
            parts.append(notes)
    return "\n".join(parts)


NOTES = f"""\
Latency is simulated per request (one scored sequence; GSM8K: one question, prefill + decode),
in seconds. speed-up = mean latency of vanilla topk ÷ the row's; latency −% = the relative
reduction; Δ = the metric's change against topk (points for accuracies; "± x" where both rows'
records keep each item's outcome: its paired standard error over (seed, item), far smaller than
the two accuracies' own ± when the policies answer most items alike). The baseline is the topk
row with the same task, model, top-k, scenario overrides (bandwidth …), allocator and seeds; "–"
when there is none. Rows of several seeds are averaged (×count shown; ± is then the mean standard
error, as the seeds score the same items). ◆ marks the Pareto front (latency vs metric) of each
policy within a task.

Outage and deadlines: a device's link is down for a fading block when its spectral efficiency
at the equal share B/U is below the lowest CQI's ({LOWEST_CQI_SE_BPS_PER_HZ} bit/s/Hz by default, 3GPP
TS 38.214 Table 5.2.2.1-2): the BS skips experts on devices it sees down, and a call over a link
truly down is lost at its deadline. Each device call has a deadline (slack × its predicted time
+ grace); a call that misses it is cut, and its experts are dropped (or run at the BS in fallback
mode). outage req % = requests that lost an expert to outage; late req % = requests with a call
cut late; "–": the record predates outage.

energy J/req: what the devices spent per request, in joules: compute (FLOPs run × the device
class's energy per FLOP) plus radio (receive power × downlink airtime + transmit power × uplink
airtime); constants and their sources in wdmoe.latency.devices; "–": the record predates energy.

p50 speed-up compares medians: under Rayleigh fading a link just above the outage threshold is
slow, and a channel-blind policy's mean latency is ruled by the rare deep fades a run happens to
hit; read the mean and the median together. A row whose mean is more than {HEAVY_TAIL_RATIO:g}×
its median gets a note under its table with what its record shows of the cause."""


def render_markdown(
    rows: Sequence[Row], plots: Sequence[Path] = (), title: str | None = "wdmoe report"
) -> str:
    """The whole report: tables per task, notes, then the plots (paths relative to the report)."""
    configs = len({r.group for r in rows})
    head = [] if title is None else [f"# {title}\n"]
    head.append(f"{len(rows)} rows: {configs} configs on {len({r.task for r in rows})} tasks.\n")
    images = [f"![{p.stem}]({p.name})" for p in plots]
    return "\n".join([*head, render_tables(rows), NOTES, "", *images, ""])

"""The README of a reproduction: the command that regenerates it, the cell, tables, study, cost."""

import shlex
from collections.abc import Sequence
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

from wdmoe import __version__
from wdmoe.config import ScenarioConfig, load_scenario
from wdmoe.latency.deadline import LOWEST_CQI_SE_BPS_PER_HZ
from wdmoe.simulate import SimSettings
from wdmoe.studies.report import NOTES, make_rows, render_tables
from wdmoe.studies.reproduce_plan import Outcome, ReproduceSettings, Timing, sim_settings
from wdmoe.studies.runner import scenario_overrides


def command_line(settings: ReproduceSettings) -> str:
    """The `wdmoe reproduce` command that regenerates this run (options that differ from the
    defaults, plus the limits, always)."""
    default = ReproduceSettings()
    args: list[str] = []
    limits: list[str] = []
    listed = ("tasks", "thetas", "allocators", "seeds", "study_thetas", "beyond")
    for f in fields(settings):
        value, name = getattr(settings, f.name), "--" + f.name.replace("_", "-")
        if f.name in ("limit", "gsm8k_limit"):
            limits += [name, "all" if value is None else str(value)]
        elif f.name == "task_limits":
            limits += [a for task, items in value for a in ("--task-limit", f"{task}={items}")]
        elif value == getattr(default, f.name):
            continue
        elif f.name in listed:
            args += [name, ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)]
        elif f.name == "overrides":
            for o in value:
                args += ["--set", o]
        elif f.name == "k_scaled":
            args.append("--k-scaled" if value else "--no-k-scaled")
        else:
            args += [name, str(value)]
    return " ".join(shlex.quote(a) for a in ["wdmoe", "reproduce", *limits, *args])


def cost_table(timings: Sequence[Timing]) -> str:
    """Measured wall seconds per item and per point, by task."""
    lines = ["| task | points timed | items per point | s per item | s per point |", "|---|---|---|---|---|"]
    for task in dict.fromkeys(t.task for t in timings):
        timed = [t for t in timings if t.task == task and t.seconds is not None]
        if not timed:
            lines.append(f"| {task} | 0 | – | – | – |")
            continue
        items, seconds = sum(t.items for t in timed), sum(t.seconds or 0.0 for t in timed)
        per_item, per_point = seconds / max(items, 1), seconds / len(timed)
        lines.append(f"| {task} | {len(timed)} | {timed[0].items} | {per_item:.2f} | {per_point:.1f} |")
    return "\n".join(lines)


def fmt_duration(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    return f"{minutes} min {sec:02d} s" if minutes else f"{seconds:.1f} s"


def resumed_text(outcome: Outcome) -> str:
    """The README's note on resumed points (their own run times are listed below), or ""."""
    resumed = sum(t.resumed for t in outcome.timings)
    if not resumed:
        return ""
    return (
        f" ({resumed} of {len(outcome.timings)} (task, point) results resumed from results.jsonl; "
        "the times they took when they ran are listed below)"
    )


def items_text(settings: ReproduceSettings) -> str:
    """``20 items per task (boolq: 100), 2 for generation tasks (at most 96 new tokens)``."""
    own = ", ".join(f"{task}: {items}" for task, items in settings.task_limits)
    return (
        f"{settings.limit or 'all'} items per task{f' ({own})' if own else ''}, "
        f"{settings.gsm8k_limit or 'all'} for generation tasks (at most {settings.max_new_tokens} new tokens)"
    )


def seeds_text(settings: ReproduceSettings) -> str:
    seeds = ", ".join(map(str, settings.seeds))
    if len(settings.seeds) == 1:
        return f"channel seed {seeds}"
    return (
        f"channel seeds {seeds} (a row averages its seeds; the latency study uses seed {settings.seeds[0]})"
    )


CUT = {
    "drop": "its experts are dropped (the model renormalises over the rest)",
    "wait": "its experts are dropped",
    "fallback": "its experts run from the BS's own copy",
}


def cell_text(sim: SimSettings, scenario: ScenarioConfig) -> str:
    """How the points' cell treats device calls: outage threshold, deadline rule, moving channel."""
    rule, min_se = sim.deadline, scenario.cell.min_se_bps_per_hz
    cqi = "CQI 1 — QPSK, code rate 78/1024 — of 3GPP TS 38.214 Table 5.2.2.1-2"
    source = cqi if min_se == LOWEST_CQI_SE_BPS_PER_HZ else f"the default {LOWEST_CQI_SE_BPS_PER_HZ} is {cqi}"
    if rule.mode == "wait":
        budget = f"every device call may take up to {rule.max_wait_s:g} s (mode `wait`)"
    else:
        budget = (
            f"each device call has the deadline slack·t̂ + grace = {rule.slack:g}·t̂ + {rule.grace_s:g} s "
            f"(t̂: its predicted time at the allocated share; at most {rule.max_wait_s:g} s; "
            f"mode `{rule.mode}`)"
        )
    moves = (
        "The channel moves layer by layer: each MoE layer is priced on the fading block of its own time."
        if sim.channel_moves
        else "Each forward is priced on the fading block of its start (the channel does not move within it)."
    )
    return (
        f"Outage: a device's link is down for a fading block when its spectral efficiency at the equal "
        f"share B/U is below {min_se:g} bit/s/Hz in either direction ({source}); the BS skips experts "
        "on devices it sees down, and a call over a link truly down is lost at its deadline. "
        f"Deadlines: {budget}; a call that misses it is cut and {CUT[rule.mode]}. {moves}"
    )


def render_readme(
    settings: ReproduceSettings, outcome: Outcome, study: str | None, plots: Sequence[Path]
) -> str:
    rows = make_rows(outcome.records)
    k_text = "k-scaled (θ·2/k)" if settings.k_scaled else "not k-scaled"
    overrides = ", ".join(f"`{o}`" for o in settings.overrides) or "none"
    sim = sim_settings(settings.allocators[0], settings.seeds[0])
    scenario = load_scenario(settings.scenario, scenario_overrides(settings.model, settings.overrides))
    head = [
        "# Reproduction: vanilla top-k against WDMoE-θ",
        "",
        f"Generated by `wdmoe reproduce` (wdmoe {__version__}) on "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')} in {fmt_duration(outcome.wall_s)}"
        f"{resumed_text(outcome)}. "
        "Regenerate (results are resumed from `results.jsonl` when it is there) with:",
        "",
        "```bash",
        command_line(settings),
        "```",
        "",
        f"Model `{settings.model}`; scenario `{settings.scenario}` (overrides: {overrides}), "
        f"{seeds_text(settings)}; WDMoE θ ∈ {{{', '.join(f'{t:g}' for t in settings.thetas)}}}, "
        f"{k_text}; allocators {', '.join(settings.allocators)}; {items_text(settings)}. "
        "Records: [results.jsonl](results.jsonl).",
        "",
        cell_text(sim, scenario),
        "",
        "## Accuracy and latency per task",
        "",
        render_tables(rows),
        NOTES,
    ]
    if study is not None:
        head += ["", "## Mixtral-8x7B latency study", "", study, ""]
        wall, data = fmt_duration(outcome.study_seconds), "[mixtral_latency.json](mixtral_latency.json)"
        head += [f"Channel seed {settings.seeds[0]}. Study wall time: {wall}. Data: {data}."]
    head += ["", "## Plots", "", *(f"![{p.stem}]({p.name})" for p in plots), ""]
    head += ["## Cost", "", "Wall seconds measured when each point ran (`timings.jsonl`):", ""]
    head += [cost_table(outcome.timings), ""]
    return "\n".join(head)

"""`wdmoe reproduce`: the paper-style comparison, end to end, into a folder of Markdown and plots.

For each channel seed (0 by default), each task (ARC-Easy, PIQA, WinoGrande, BoolQ, ARC-Challenge,
GSM8K by default), each allocator (equal, minmax) and each policy — vanilla ``topk`` and WDMoE-θ
for every θ (k-scaled by default: θ·2/k, so θ means for the default model's k = 7 what it means
for Mixtral's k = 2) — one :class:`~wdmoe.studies.runner.EvalPoint` runs on the ``paper``
scenario, in that order (an interrupted run leaves whole tables for the first seed first); the
report averages a config's seeds into one row. Records are appended to ``OUT/results.jsonl``
(resumable: a rerun skips what is done). Then ``OUT/README.md`` gets the
report's tables (:mod:`wdmoe.studies.report`), the Mixtral-8x7B latency study
(:mod:`wdmoe.studies.latency_study`, on router scores of the same model), the command that regenerates
it, the date, the wall time and the measured cost per item; the plots go beside it.
"""

import json
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from wdmoe import __version__
from wdmoe.config import ScenarioConfig, load_scenario
from wdmoe.errors import ConfigError
from wdmoe.eval.harness import EvalSettings
from wdmoe.eval.results import append_record, read_records
from wdmoe.eval.tasks import get_task
from wdmoe.latency.deadline import LOWEST_CQI_SE_BPS_PER_HZ
from wdmoe.simulate import SimSettings
from wdmoe.studies.latency_study import (
    DEFAULT_THETAS as STUDY_THETAS,
)
from wdmoe.studies.latency_study import (
    StudyRow,
    collect_logits,
    render_study,
    run_study,
    study_prompts,
)
from wdmoe.studies.report import NOTES, make_rows, policy_label, render_tables, write_plots
from wdmoe.studies.runner import EvalPoint, Evaluator, PolicySpec, scenario_overrides

PAPER_TASKS = ("arc_easy", "piqa", "winogrande", "boolq", "arc_challenge", "gsm8k")
PAPER_THETAS = (0.05, 0.1, 0.2, 0.3)
# Sized for ≲ 40 min on 2 CPU cores, one torch thread, default model. Measured s/item (quiet machine
# / machine loaded by other jobs): arc_easy 0.7 / 1.2, piqa 0.8 / 1.7, winogrande 0.3 / 0.9, boolq
# 2.5 / 5.7, arc_challenge 0.6 / 1.3, gsm8k ≈ 0.1 / 0.2 s per new token. × 10 configs: 20 items and
# 2 GSM8K questions of ≤ 96 tokens take ≈ 20 min (quiet) to ≈ 42 min (loaded); the study ≈ 1 min.
DEFAULT_LIMIT = 20
DEFAULT_GSM8K_LIMIT = 2
DEFAULT_MAX_NEW_TOKENS = 96


@dataclass(frozen=True)
class ReproduceSettings:
    """What `wdmoe reproduce` runs. ``seeds``: channel trace seeds (every point runs on each; the
    latency study on the first); ``limit``: items per task (None: all); generation tasks (GSM8K)
    use ``gsm8k_limit`` and ``max_new_tokens`` instead; ``task_limits``: (task, items) pairs that
    replace either limit for that task; ``study_prompts``: prompts per task for the Mixtral
    latency study (0: skip it)."""

    tasks: tuple[str, ...] = PAPER_TASKS
    thetas: tuple[float, ...] = PAPER_THETAS
    allocators: tuple[str, ...] = ("equal", "minmax")
    k_scaled: bool = True
    model: str = "default"
    scenario: str = "paper"
    overrides: tuple[str, ...] = ()
    seeds: tuple[int, ...] = (0,)
    limit: int | None = DEFAULT_LIMIT
    gsm8k_limit: int | None = DEFAULT_GSM8K_LIMIT
    task_limits: tuple[tuple[str, int], ...] = ()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    out_dir: Path = Path("docs/reproduce")
    data_dir: Path | None = None
    batch_size: int = 16
    study_prompts: int = 20
    study_thetas: tuple[float, ...] = STUDY_THETAS

    def __post_init__(self) -> None:
        if not self.tasks:
            raise ConfigError("--tasks is empty; give e.g. arc_easy,piqa")
        if not self.thetas or any(not 0.0 < t <= 1.0 for t in self.thetas):
            raise ConfigError(f"--thetas = {list(self.thetas)} is out of range; allowed: values in (0, 1]")
        if not self.allocators:
            raise ConfigError("--allocators is empty; give e.g. equal,minmax")
        for name, value in (("--limit", self.limit), ("--gsm8k-limit", self.gsm8k_limit)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} = {value} is out of range; allowed: ≥ 1 (or unset: all items)")
        if self.max_new_tokens < 1 or self.study_prompts < 0:
            raise ConfigError(
                f"--max-new-tokens must be ≥ 1 and --study-prompts ≥ 0, got "
                f"{self.max_new_tokens} and {self.study_prompts}"
            )
        if not self.seeds or any(s < 0 for s in self.seeds) or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"--seeds = {list(self.seeds)} is invalid; allowed: distinct integers ≥ 0")
        self.check_task_limits()

    def check_task_limits(self) -> None:
        names = [task for task, _ in self.task_limits]
        for task, items in self.task_limits:
            flag = f"--task-limit {task}={items}"
            if task not in self.tasks:
                raise ConfigError(f"{flag}: {task!r} is not one of --tasks ({', '.join(self.tasks)})")
            if items < 1:
                raise ConfigError(f"{flag}: {items} items is out of range; allowed: ≥ 1")
            if names.count(task) > 1:
                raise ConfigError(f"--task-limit names {task!r} twice; give one limit per task")

    def limit_for(self, task: str) -> int | None:
        """Items of ``task``: its ``task_limits`` entry, else ``gsm8k_limit`` (generation) or ``limit``."""
        own = dict(self.task_limits)
        if task in own:
            return own[task]
        return self.gsm8k_limit if is_generation(task) else self.limit


def parse_task_limit(text: str) -> tuple[str, int]:
    """``"boolq=100"`` → ("boolq", 100); anything else raises a ConfigError naming ``text``."""
    task, sep, raw = text.partition("=")
    if not sep or not task.strip():
        raise ConfigError(f"--task-limit {text!r} is malformed; allowed: TASK=ITEMS (e.g. boolq=100)")
    try:
        return task.strip(), int(raw)
    except ValueError:
        raise ConfigError(
            f"--task-limit {text!r}: {raw.strip()!r} is not a whole number of items (e.g. boolq=100)"
        ) from None


def policies(settings: ReproduceSettings) -> list[tuple[str, dict[str, Any]]]:
    """Vanilla topk, then WDMoE-θ for each θ."""
    return [("topk", {})] + [("wdmoe", {"theta": t, "k_scaled": settings.k_scaled}) for t in settings.thetas]


def is_generation(task: str) -> bool:
    return get_task(task).kind == "generate_exact"


def sim_settings(allocator: str, seed: int) -> SimSettings:
    """The simulation of every point: the allocator and seed, the rest (deadline rule, a channel
    that moves layer by layer, perfect CSI) at SimSettings' defaults."""
    return SimSettings(allocator=allocator, seed=seed)


def point_for(
    settings: ReproduceSettings, task: str, policy: str, params: dict, allocator: str, seed: int
) -> EvalPoint:
    """The evaluation point of one (seed, task, policy, allocator); generation tasks get their own
    generation cap (the others keep the runner's default cap, unused by their scorers)."""
    scoring = EvalSettings(batch_size=settings.batch_size)
    if is_generation(task):
        scoring = replace(scoring, max_new_tokens=settings.max_new_tokens)
    return EvalPoint(
        model=settings.model,
        policy=PolicySpec(policy, params),
        scenario=settings.scenario,
        overrides=settings.overrides,
        sim=sim_settings(allocator, seed),
        scoring=scoring,
        limit=settings.limit_for(task),
        data_dir=settings.data_dir,
    )


def plan(settings: ReproduceSettings) -> list[tuple[str, EvalPoint]]:
    """(task, point) in run order: seed → task → allocator → policy, so that an interrupted run
    leaves whole tables, all of the first seed first."""
    return [
        (task, point_for(settings, task, name, params, allocator, seed))
        for seed in settings.seeds
        for task in settings.tasks
        for allocator in settings.allocators
        for name, params in policies(settings)
    ]


def point_label(task: str, point: EvalPoint, seeds: int) -> str:
    """``arc_easy · wdmoe θ=0.1 k-scaled · equal`` (``· seed 1`` when there are several seeds)."""
    label = f"{task} · {policy_label(point.policy.name, point.policy.params)} · {point.sim.allocator}"
    return label + (f" · seed {point.sim.seed}" if seeds > 1 else "")


@dataclass(frozen=True)
class Timing:
    """Wall seconds one (task, point) took (None: unknown); ``resumed``: its record was already
    there (its seconds then come from ``timings.jsonl``, when the run that made it wrote them)."""

    task: str
    label: str
    items: int
    seconds: float | None
    resumed: bool


@dataclass
class Outcome:
    """What a reproduction produced."""

    records: list[dict[str, Any]] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)
    study: list[StudyRow] = field(default_factory=list)
    study_seconds: float = 0.0
    wall_s: float = 0.0
    files: list[Path] = field(default_factory=list)


Progress = Callable[[str, int, int], None]


def _collect(flags: list[bool]) -> Callable[[str, bool], None]:
    """An ``on_task`` callback keeping whether each task was skipped (already in the file)."""
    return lambda _name, skipped: flags.append(skipped)


def run_evaluations(
    settings: ReproduceSettings, evaluator: Evaluator, outcome: Outcome, progress: Progress | None = None
) -> None:
    """Every point of :func:`plan`, appended to ``OUT/results.jsonl`` (skipping what is done); the
    wall seconds of each point run go to ``OUT/timings.jsonl`` (keyed like its record)."""
    out, timings = settings.out_dir / "results.jsonl", settings.out_dir / "timings.jsonl"
    earlier = {r["key"]: r for r in read_records(timings)}
    steps = plan(settings)
    evaluator.model(steps[0][1])  # load once, before the clock runs
    for i, (task, point) in enumerate(steps):
        label = point_label(task, point, len(settings.seeds))
        if progress is not None:
            progress(label, i, len(steps))
        skipped: list[bool] = []
        t0 = time.perf_counter()
        record = evaluator.run(point, [task], out, on_task=_collect(skipped))[0]
        seconds: float | None = time.perf_counter() - t0
        outcome.records.append(record)
        if any(skipped):
            seconds = earlier[record["key"]]["seconds"] if record["key"] in earlier else None
        else:
            append_record(timings, {"key": record["key"], "task": task, "label": label, "seconds": seconds})
        outcome.timings.append(Timing(task, label, int(record["n"]), seconds, any(skipped)))
    if progress is not None:
        progress("evaluations done", len(steps), len(steps))


def study_overrides(overrides: Sequence[str]) -> list[str]:
    """The user's cell/channel overrides apply to the study; its model stays the scenario's own."""
    return [o for o in overrides if not o.split("=", 1)[0].strip().startswith("model")]


def run_latency_study(settings: ReproduceSettings, evaluator: Evaluator, outcome: Outcome) -> str:
    """Router scores of the settings' model on the tasks' prompts, priced at the scenario's own
    (Mixtral) dimensions; returns the Markdown section."""
    t0 = time.perf_counter()
    wm, tok = evaluator.model(EvalPoint(model=settings.model))
    prompts = study_prompts(settings.tasks, settings.study_prompts, settings.data_dir)
    samples = collect_logits(wm, tok, prompts)
    scenario = load_scenario(settings.scenario, study_overrides(settings.overrides))
    outcome.study = run_study(
        samples, scenario, settings.study_thetas, settings.allocators, settings.seeds[0]
    )
    outcome.study_seconds = time.perf_counter() - t0
    payload = {"scenario": scenario.to_dict(), "rows": [asdict(r) for r in outcome.study]}
    study_file = settings.out_dir / "mixtral_latency.json"
    study_file.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    outcome.files.append(study_file)
    return render_study(outcome.study, scenario, settings.model)


def command_line(settings: ReproduceSettings) -> str:
    """The `wdmoe reproduce` command that regenerates this run (options that differ from the
    defaults, plus the limits, always)."""
    default = ReproduceSettings()
    args: list[str] = []
    limits: list[str] = []
    listed = ("tasks", "thetas", "allocators", "seeds", "study_thetas")
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


def reproduce(
    settings: ReproduceSettings, progress: Progress | None = None, evaluator: Evaluator | None = None
) -> Outcome:
    """Run the evaluations and the study; write README.md and the plots into ``out_dir``."""
    for task in settings.tasks:
        get_task(task)  # an unknown name fails before anything runs
    t0 = time.perf_counter()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    evaluator = evaluator or Evaluator()
    outcome = Outcome()
    run_evaluations(settings, evaluator, outcome, progress)
    study = None
    if settings.study_prompts > 0:
        if progress is not None:
            progress("Mixtral-8x7B latency study", 0, 1)
        study = run_latency_study(settings, evaluator, outcome)
    plots = write_plots(make_rows(outcome.records), settings.out_dir)
    outcome.wall_s = time.perf_counter() - t0
    readme = settings.out_dir / "README.md"
    readme.write_text(render_readme(settings, outcome, study, plots), encoding="utf-8")
    outcome.files += [settings.out_dir / "results.jsonl", settings.out_dir / "timings.jsonl", readme, *plots]
    return outcome

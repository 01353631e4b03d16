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
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict

from wdmoe.config import load_scenario
from wdmoe.eval.results import append_record, read_records
from wdmoe.eval.tasks import get_task
from wdmoe.studies.latency_study import (
    collect_logits,
    render_presets,
    render_study,
    run_presets,
    run_study,
    study_prompts,
)
from wdmoe.studies.report import make_rows, write_plots
from wdmoe.studies.reproduce_page import command_line, render_readme
from wdmoe.studies.reproduce_plan import (
    Outcome,
    ReproduceSettings,
    Timing,
    parse_task_limit,
    plan,
    point_label,
)
from wdmoe.studies.runner import EvalPoint, Evaluator

__all__ = [
    "Outcome",
    "ReproduceSettings",
    "Timing",
    "command_line",
    "parse_task_limit",
    "plan",
    "point_label",
    "reproduce",
]

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
    (Mixtral) dimensions, then at each of ``study_presets``' dimensions; returns the Markdown
    section."""
    t0 = time.perf_counter()
    wm, tok = evaluator.model(EvalPoint(model=settings.model))
    prompts = study_prompts(settings.tasks, settings.study_prompts, settings.data_dir)
    samples = collect_logits(wm, tok, prompts)
    overrides = study_overrides(settings.overrides)
    scenario = load_scenario(settings.scenario, overrides)
    thetas, allocators, seed = settings.study_thetas, settings.allocators, settings.seeds[0]
    outcome.study = run_study(samples, scenario, thetas, allocators, seed)
    presets = run_presets(
        samples,
        settings.scenario,
        overrides,
        settings.study_presets,
        thetas=thetas,
        allocators=allocators,
        seed=seed,
    )
    outcome.study_seconds = time.perf_counter() - t0
    payload = {
        "scenario": scenario.to_dict(),
        "rows": [asdict(r) for r in outcome.study],
        "presets": {
            n: {"model": asdict(s.model), "rows": [asdict(r) for r in rows]}
            for n, (s, rows) in presets.items()
        },
    }
    study_file = settings.out_dir / "mixtral_latency.json"
    study_file.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    outcome.files.append(study_file)
    text = render_study(outcome.study, scenario, settings.model)
    if not presets:
        return text
    return "\n\n".join([text, PRESETS_NOTE.format(model=settings.model), render_presets(presets)])


PRESETS_NOTE = (
    "The same router scores of `{model}` priced at other models' dimensions (configs/models): a "
    "preset with more experts than the scores reads consecutive layers' scores as one finer router "
    "(`wider_logits`); routing is softmax top-k renormalised, θ at each preset's own k (no "
    "k-scaling: the mean share is 1/k, so a θ drops more at larger k). Speed-up against topk with "
    "the same allocator; drop rate in brackets."
)


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

"""``wdmoe eval``: tasks scored with a policy inside the simulated cell, one resumable record per
(config, task) (thin; the runner is wdmoe.studies.runner)."""

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from wdmoe.cli.common import (
    GraceMsOpt,
    MaxWaitOpt,
    ModeOpt,
    SlackOpt,
    err,
    fail,
    parse_params,
    progress_bar,
    quiet_transformers,
)
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.policies import POLICIES

if TYPE_CHECKING:
    from wdmoe.studies.runner import EvalPoint


def parse_tasks(text: str) -> list[str]:
    """``arc_easy,piqa`` → registered task names (an unknown one raises UnknownNameError)."""
    from wdmoe.eval.tasks import get_task

    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise fail(ValueError("--tasks is empty; give e.g. --tasks arc_easy,piqa"))
    return [get_task(name).name for name in names]


def run_with_progress(point: "EvalPoint", names: list[str], out: Path) -> list[dict[str, Any]]:
    """Evaluate ``point`` on the tasks ``names`` into ``out``, one bar step per task."""
    from wdmoe.studies.runner import Evaluator

    with progress_bar() as bar:
        job = bar.add_task(f"eval {names[0]}", total=len(names))

        def done(name: str, skipped: bool) -> None:
            if skipped:
                err.print(f"[dim]{name}: already in {out}, skipped[/]")
            bar.advance(job)
            following = names[names.index(name) + 1 :]
            if following:
                bar.update(job, description=f"eval {following[0]}")

        return Evaluator().run(point, names, out, on_task=done)


def placement_override(path: Path | None) -> tuple[str, ...]:
    """``--placement FILE`` as the scenario override it stands for (the path made absolute)."""
    if path is not None and not path.is_file():
        raise ConfigError(f"--placement {str(path)!r} does not exist; write one with `wdmoe plan --out FILE`")
    return () if path is None else (f"cell.placement={path.resolve()}",)


def eval_cmd(
    tasks: Annotated[str, typer.Option(help="Comma-separated registered tasks, e.g. arc_easy,piqa.")],
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of the benchmark JSONL files (default: $WDMOE_DATA).")
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Items per task (default: all).")] = None,
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    policy: Annotated[
        str, typer.Option(help=f"Expert selection policy: {', '.join(POLICIES.names())}.")
    ] = "topk",
    theta: Annotated[float | None, typer.Option(help="θ of wdmoe-type policies.")] = None,
    param: Annotated[
        list[str] | None,
        typer.Option(help="Another policy parameter NAME=VALUE, e.g. k_scaled=true, tau_s=0.05, p=0.9."),
    ] = None,
    top_k: Annotated[int | None, typer.Option("--top-k", help="Router candidates per token.")] = None,
    scenario: Annotated[str, typer.Option(help="Scenario preset or .toml file.")] = "paper",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a scenario field: a.b=value.")
    ] = None,
    allocator: Annotated[
        str, typer.Option(help="Bandwidth allocator: equal, minmax, proportional, energy.")
    ] = "equal",
    energy_slack: Annotated[
        float, typer.Option(help="--allocator energy: least energy within (1 + s) × min-max's wait.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Channel trace seed.")] = 0,
    placement: Annotated[
        Path | None,
        typer.Option(help="Placement file of `wdmoe plan` (= --set cell.placement=FILE; default: e mod U)."),
    ] = None,
    out: Annotated[Path, typer.Option(help="Results file (JSON Lines, resumable).")] = Path(
        "results/eval.jsonl"
    ),
    csi_delay_blocks: Annotated[
        int, typer.Option(help="Stale CSI: the BS sees the channel this many fading blocks late.")
    ] = 0,
    csi_error_db: Annotated[
        float, typer.Option(help="Noisy CSI: log-normal estimation error σ in dB.")
    ] = 0.0,
    mode: ModeOpt = "drop",
    slack: SlackOpt = 3.0,
    grace_ms: GraceMsOpt = 250.0,
    max_wait_s: MaxWaitOpt = 30.0,
    channel_per_forward: Annotated[
        bool,
        typer.Option(
            help="Price a whole forward on the channel of its start (block fading per forward, as before)."
        ),
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward (scoring only).")] = 16,
    share_context: Annotated[
        bool,
        typer.Option(
            help="Multiple choice: run each context once for all its choices (same scores, faster)."
        ),
    ] = True,
    max_new_tokens: Annotated[int, typer.Option(help="Generation cap for GSM8K-type tasks.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print the records as JSON lines.")] = False,
) -> None:
    """Evaluate tasks with a policy inside the simulation; one resumable record per (config, task).

    Latency is per request: each scored sequence (context + choice) is one prefill; GSM8K runs
    one question at a time (prefill + decode)."""
    from wdmoe.eval.harness import EvalSettings
    from wdmoe.eval.results import select_records
    from wdmoe.latency.deadline import DeadlineRule
    from wdmoe.simulate import SimSettings
    from wdmoe.studies.runner import EvalPoint, PolicySpec

    quiet_transformers()
    try:
        params = parse_params(param or [])
        point = EvalPoint(
            model=model,
            policy=PolicySpec(policy, params if theta is None else {"theta": theta, **params}, top_k),
            scenario=scenario,
            overrides=tuple(set_ or ()) + placement_override(placement),
            sim=SimSettings(
                allocator=allocator,
                seed=seed,
                energy_slack=energy_slack,
                csi_delay_blocks=csi_delay_blocks,
                csi_error_std_db=csi_error_db,
                deadline=DeadlineRule(mode, slack, grace_ms / 1e3, max_wait_s),
                channel_moves=not channel_per_forward,
            ),
            scoring=EvalSettings(
                batch_size=batch_size, max_new_tokens=max_new_tokens, share_context=share_context
            ),
            limit=limit,
            data_dir=data_dir,
        )
        records = run_with_progress(point, parse_tasks(tasks), out)
    except WdmoeError as e:
        raise fail(e) from e
    for r in select_records(out, [r["key"] for r in records]):
        if as_json:
            typer.echo(json.dumps(r, sort_keys=True))
        metrics = " ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items())
        err.print(f"{r['task']}: n={r['n']} {metrics} · mean latency {r['latency'].get('mean_s', 0):.4f} s")
    err.print(f"[dim]results: {out}[/]")

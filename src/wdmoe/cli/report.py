"""``wdmoe report`` and ``wdmoe reproduce`` (thin; the work is in wdmoe.studies.report and
wdmoe.studies.reproduce)."""

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from wdmoe.cli.common import err, fail, progress_bar, quiet_transformers, table_console
from wdmoe.errors import WdmoeError


def print_highlights(rows: tuple) -> None:
    """Per task: vanilla latency and the fastest other config with its accuracy change."""
    from wdmoe.studies.report import highlights

    table = Table(title="per task: the largest speed-up against vanilla topk")
    for col in ("task", "configs", "topk mean s", "fastest", "speed-up", "Δ metric"):
        table.add_column(col, justify="right")
    for h in highlights(list(rows)):
        table.add_row(
            h.task,
            str(h.configs),
            "–" if h.vanilla_s is None else f"{h.vanilla_s:.4g}",
            h.best or "–",
            "–" if h.speedup is None else f"{h.speedup:.2f}×",
            "–" if h.delta is None else f"{h.delta:+.1f}",
        )
    table_console(stderr=True).print(table)


def report_cmd(
    results: Annotated[
        Path,
        typer.Argument(help="Results file (JSON Lines from `wdmoe eval` / reproduce, or `wdmoe load`)."),
    ],
    out: Annotated[Path, typer.Option("--out", help="Folder for report.md and the plots.")] = Path("report"),
    title: Annotated[str, typer.Option(help="The report's title.")] = "wdmoe report",
) -> None:
    """Tables per task (accuracy, latency, ×speed-up and Δaccuracy against vanilla topk) and plots;
    with `wdmoe load` results beside it (load*.jsonl), the latency under load section; with the
    energy trade-off study's (energy_tradeoff*.json), the energy against latency section."""
    from wdmoe.studies.load_io import read_load_files
    from wdmoe.studies.report import find_energy_files, find_load_files, load_records, write_report

    try:
        energy_files = find_energy_files(results)
        study = results in energy_files  # the trade-off study's JSON (not JSON Lines): no task tables
        load_files = find_load_files(results.parent if study else results)
        records = [] if study or results in load_files else load_records(results)
        report = write_report(records, out, title, load=read_load_files(load_files), energy=energy_files)
    except WdmoeError as e:
        raise fail(e) from e
    if report.rows:
        print_highlights(report.rows)
    err.print(f"wrote [bold]{report.markdown}[/] ({len(report.rows)} rows) and {len(report.plots)} plots")


def _numbers(text: str, option: str, kind: type[int] | type[float]) -> tuple:
    """``"0,1,2"`` → (0, 1, 2) of ``kind``; anything else exits naming the option and the text."""
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        what = "integers" if kind is int else "numbers"
        raise fail(ValueError(f"{option} = {text!r} is not a comma-separated list of {what}")) from e


def _floats(text: str, option: str) -> tuple[float, ...]:
    return _numbers(text, option, float)


def _names(text: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in text.split(",") if v.strip())


def _limit(text: str, option: str) -> int | None:
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError as e:
        raise fail(ValueError(f"{option} = {text!r} is not an integer or 'all'")) from e


class StepProgress:
    """One rich bar over the reproduction's points (on stderr)."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.job: TaskID | None = None

    def __call__(self, label: str, done: int, total: int) -> None:
        if self.job is None:
            self.job = self.bar.add_task(label, total=total)
        self.bar.update(self.job, description=label, completed=done, total=total)


def reproduce_cmd(
    limit: Annotated[str, typer.Option(help="Items per task, or 'all'.")] = "20",
    gsm8k_limit: Annotated[str, typer.Option(help="Items of generation tasks (GSM8K), or 'all'.")] = "2",
    max_new_tokens: Annotated[int, typer.Option(help="Generation cap for GSM8K.")] = 96,
    tasks: Annotated[str, typer.Option(help="Comma-separated registered tasks.")] = (
        "arc_easy,piqa,winogrande,boolq,arc_challenge,gsm8k"
    ),
    thetas: Annotated[str, typer.Option(help="WDMoE θ values, comma-separated.")] = "0.05,0.1,0.2,0.3",
    k_scaled: Annotated[bool, typer.Option(help="Use θ·2/k (θ as at Mixtral's k = 2).")] = True,
    allocators: Annotated[str, typer.Option(help="Bandwidth allocators, comma-separated.")] = "equal,minmax",
    model: Annotated[str, typer.Option(help="'default' or a local checkpoint folder.")] = "default",
    scenario: Annotated[str, typer.Option(help="Scenario preset or .toml file.")] = "paper",
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a scenario field: a.b=value.")
    ] = None,
    seeds: Annotated[
        str, typer.Option(help="Channel trace seeds, comma-separated (rows average them).")
    ] = "0",
    task_limit: Annotated[
        list[str] | None,
        typer.Option(help="TASK=ITEMS: items of one task, instead of --limit (repeatable)."),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option(help="Folder of the benchmark JSONL files (default: $WDMOE_DATA).")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Sequences per forward (scoring only).")] = 16,
    study_prompts: Annotated[
        int, typer.Option(help="Prompts per task for the Mixtral latency study (0: skip).")
    ] = 20,
    study_thetas: Annotated[str, typer.Option(help="θ values of the study (k = 2).")] = "0.1,0.2,0.3,0.4",
    out_dir: Annotated[Path, typer.Option(help="Folder for results.jsonl, README.md and plots.")] = Path(
        "docs/reproduce"
    ),
    threads: Annotated[
        int, typer.Option(help="torch CPU threads (1 is fastest on a shared machine; 0: torch's default).")
    ] = 1,
    beyond: Annotated[
        str,
        typer.Option(
            help="Beyond-paper rows, comma-separated: dynskip, capacity, marginal (policies); "
            "adaptive (wire format by SNR), placement (needs --placement)."
        ),
    ] = "",
    placement: Annotated[
        Path | None, typer.Option(help="Placement file of `wdmoe plan` for --beyond placement.")
    ] = None,
) -> None:
    """The paper-style table: vanilla top-k vs WDMoE-θ with equal and minmax bandwidth, per task,
    plus the Mixtral-8x7B latency study; resumable (results.jsonl), written to OUT_DIR/README.md."""
    import torch

    from wdmoe.studies.report import make_rows
    from wdmoe.studies.reproduce import ReproduceSettings, parse_task_limit, reproduce
    from wdmoe.studies.runner import Evaluator

    quiet_transformers()
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        settings = ReproduceSettings(
            tasks=_names(tasks),
            thetas=_floats(thetas, "--thetas"),
            allocators=_names(allocators),
            k_scaled=k_scaled,
            model=model,
            scenario=scenario,
            overrides=tuple(set_ or ()),
            seeds=_numbers(seeds, "--seeds", int),
            limit=_limit(limit, "--limit"),
            task_limits=tuple(parse_task_limit(t) for t in task_limit or ()),
            gsm8k_limit=_limit(gsm8k_limit, "--gsm8k-limit"),
            max_new_tokens=max_new_tokens,
            out_dir=out_dir,
            data_dir=data_dir,
            batch_size=batch_size,
            study_prompts=study_prompts,
            study_thetas=_floats(study_thetas, "--study-thetas"),
            beyond=_names(beyond) if beyond else (),
            placement=placement,
        )
        with progress_bar() as bar:
            outcome = reproduce(settings, StepProgress(bar), Evaluator())
    except WdmoeError as e:
        raise fail(e) from e
    finally:
        torch.set_num_threads(before)
    print_highlights(tuple(make_rows(outcome.records)))
    run = [t for t in outcome.timings if not t.resumed]
    err.print(
        f"wrote [bold]{out_dir / 'README.md'}[/] in {outcome.wall_s:.0f} s "
        f"({len(run)} points run, {len(outcome.timings) - len(run)} resumed)"
    )

"""``wdmoe sweep GRID``: every point of a grid file evaluated in parallel into one resumable results
file (thin; grids, planning and the workers live in wdmoe.studies.sweep)."""

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from wdmoe.cli.common import err, fail, progress_bar, quiet_transformers, table_console
from wdmoe.errors import WdmoeError

if TYPE_CHECKING:
    from wdmoe.studies.runner import EvalPoint
    from wdmoe.studies.sweep import Grid, Job, PointResult


def _label(point: "EvalPoint", grid: "Grid") -> str:
    from wdmoe.studies.sweep import describe

    return " · ".join(f"{k} {v}" for k, v in describe(point, grid.overrides).items())


def print_points(points: list["EvalPoint"], jobs: list["Job"], grid: "Grid", out: Path) -> None:
    """The expanded points as a table (with the tasks each still needs) and the count."""
    from wdmoe.studies.sweep import describe

    rows = [describe(p, grid.overrides) for p in points]
    todo = {job.index: len(job.tasks) for job in jobs}
    columns = list(dict.fromkeys(k for row in rows for k in row))
    table = Table(title=f"{len(points)} points × tasks {', '.join(grid.tasks)} · model {grid.model}")
    for col in ["#", *columns, "tasks to run"]:
        table.add_column(col, justify="right" if col in ("#", "top-k", "bandwidth", "seed") else "left")
    for i, row in enumerate(rows):
        left = todo.get(i, 0)
        table.add_row(str(i + 1), *(row.get(c, "") for c in columns), str(left) if left else "done")
    console = table_console()
    console.print(table)
    runs = sum(todo.values())
    done = f"; {len(points) - len(jobs)} points already complete in {out}" if len(jobs) < len(points) else ""
    console.print(
        f"{len(points)} points × {len(grid.tasks)} tasks = {len(points) * len(grid.tasks)} records; "
        f"{len(jobs)} points to run ({runs} records){done}"
    )


def _bar() -> Progress:
    return progress_bar(TextColumn("ETA"), TimeRemainingColumn())


def sweep_cmd(
    grid: Annotated[Path, typer.Argument(help="Grid file (TOML): the lists whose product is swept.")],
    out: Annotated[Path, typer.Option(help="Results file (JSON Lines, resumable).")] = Path(
        "results/sweep.jsonl"
    ),
    workers: Annotated[
        int | None, typer.Option(help="Worker processes (default: min(2, CPU cores)); 1 runs in-process.")
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option("--ray-address", help="Run the points as Ray tasks: host:port, 'auto' or 'local'."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the expanded points and their count; run nothing.")
    ] = False,
) -> None:
    """Evaluate every point of a grid (policies × θ × top-k × scenarios × bandwidths × allocators ×
    seeds) on its tasks in parallel; one record per (point, task), skipped when already in --out."""
    from wdmoe.studies import sweep

    quiet_transformers()
    if workers is not None and workers < 1:
        raise fail(ValueError(f"--workers must be ≥ 1, got {workers}"))
    try:
        spec = sweep.load_grid(grid)
        points = sweep.expand(spec)
        jobs = sweep.plan(points, spec.tasks, out)
    except WdmoeError as e:
        raise fail(e) from e
    if dry_run:
        print_points(points, jobs, spec, out)
        return
    skipped = len(points) - len(jobs)
    if skipped:
        err.print(f"[dim]{skipped} of {len(points)} points already in {out}, skipped[/]")
    failed: list[PointResult] = []
    with _bar() as bar:
        task = bar.add_task("sweep", total=len(points), completed=skipped)

        def report(result: "PointResult") -> None:
            bar.advance(task)
            if result.error is not None:
                failed.append(result)
                where = f"point {result.job.index + 1}: {_label(result.job.point, spec)}"
                bar.console.print(f"[bold red]failed[/] {where}\n  {result.error}")

        try:
            sweep.run_sweep(jobs, out, workers=workers, ray_address=ray_address, on_result=report)
        except WdmoeError as e:
            raise fail(e) from e
    err.print(
        f"{len(jobs) - len(failed)} points run, {skipped} skipped, {len(failed)} failed · results: {out}"
    )
    if failed:
        raise typer.Exit(code=1)

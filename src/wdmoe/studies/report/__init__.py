"""Reports over evaluation records (pure functions, no model code): table rows (``rows``),
Markdown (``markdown``) and plots (``plots``), written together by :func:`write_report`.

Input: the JSON Lines records of `wdmoe eval` / `wdmoe sweep` / `wdmoe reproduce` (schema:
:func:`wdmoe.eval.results.make_record`); :mod:`wdmoe.studies.report.rows` says how rows are formed
and compared. The records of `wdmoe load` (:mod:`wdmoe.studies.load_io`) add the "Latency under
load" section (:mod:`wdmoe.studies.report.load`); the `energy` allocator's trade-off study
(``energy_tradeoff*.json``) the "Energy against latency" section (:mod:`wdmoe.studies.report.energy`).
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wdmoe.errors import ConfigError
from wdmoe.serving.load import LoadRecord
from wdmoe.studies.report.energy import ENERGY_PLOT_NAME, find_energy_files, write_energy_section
from wdmoe.studies.report.load import (
    LOAD_PLOT_NAMES,
    find_load_files,
    render_load_section,
    write_load_section,
)
from wdmoe.studies.report.markdown import (
    NOTES,
    render_markdown,
    render_tables,
    tail_note,
    tail_notes,
    task_table,
)
from wdmoe.studies.report.plots import PLOT_NAMES, write_plots
from wdmoe.studies.report.rows import (
    HEAVY_TAIL_RATIO,
    Comparison,
    Highlight,
    Row,
    baseline,
    check_record,
    compare,
    fronts,
    highlights,
    load_records,
    make_row,
    make_rows,
    pareto_front,
    policy_label,
    primary_metric,
    quality,
)
from wdmoe.studies.report.tails import tail_ratio, worst_link


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote."""

    markdown: Path
    plots: tuple[Path, ...]
    rows: tuple[Row, ...]


def write_report(
    records: Sequence[Mapping[str, Any]],
    folder: Path,
    title: str = "wdmoe report",
    load: Sequence[LoadRecord] = (),
    energy: Sequence[Path] = (),
) -> Report:
    """``folder/report.md`` with a table per task, and the plots beside it; then, with ``load``
    records (`wdmoe load`), the "Latency under load" section and its two plots; with ``energy``
    files (benchmarks/energy_tradeoff.py), the "Energy against latency" section and its plot. Any
    may be empty, not all."""
    if not records and not load and not energy:
        raise ConfigError("no records to report on")
    folder = Path(folder)
    rows = make_rows(records) if records else []
    plots = write_plots(rows, folder) if rows else []
    text = render_markdown(rows, plots, title) if rows else f"# {title}\n"
    if load:
        section, load_plots = write_load_section(load, folder)
        text, plots = f"{text}\n{section}", [*plots, *load_plots]
    if energy:
        section, energy_plots = write_energy_section(energy, folder)
        text, plots = f"{text}\n{section}", [*plots, *energy_plots]
    markdown = folder / "report.md"
    markdown.parent.mkdir(parents=True, exist_ok=True)
    markdown.write_text(text, encoding="utf-8")
    return Report(markdown, tuple(plots), tuple(rows))


__all__ = [
    "ENERGY_PLOT_NAME",
    "HEAVY_TAIL_RATIO",
    "LOAD_PLOT_NAMES",
    "NOTES",
    "PLOT_NAMES",
    "Comparison",
    "Highlight",
    "Report",
    "Row",
    "baseline",
    "check_record",
    "compare",
    "find_energy_files",
    "find_load_files",
    "fronts",
    "highlights",
    "load_records",
    "make_row",
    "make_rows",
    "pareto_front",
    "policy_label",
    "primary_metric",
    "quality",
    "render_load_section",
    "render_markdown",
    "render_tables",
    "tail_note",
    "tail_notes",
    "tail_ratio",
    "task_table",
    "worst_link",
    "write_load_section",
    "write_plots",
    "write_report",
]

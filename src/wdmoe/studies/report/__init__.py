"""Reports over evaluation records (pure functions, no model code): table rows (``rows``),
Markdown (``markdown``) and plots (``plots``), written together by :func:`write_report`.

Input: the JSON Lines records of `wdmoe eval` / `wdmoe sweep` / `wdmoe reproduce` (schema:
:func:`wdmoe.eval.results.make_record`); :mod:`wdmoe.studies.report.rows` says how rows are formed
and compared.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wdmoe.errors import ConfigError
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
    tail_ratio,
    worst_link,
)


@dataclass(frozen=True)
class Report:
    """What :func:`write_report` wrote."""

    markdown: Path
    plots: tuple[Path, ...]
    rows: tuple[Row, ...]


def write_report(records: Sequence[Mapping[str, Any]], folder: Path, title: str = "wdmoe report") -> Report:
    """``folder/report.md`` with a table per task, and the plots beside it."""
    if not records:
        raise ConfigError("no records to report on")
    rows = make_rows(records)
    folder = Path(folder)
    plots = write_plots(rows, folder)
    markdown = folder / "report.md"
    markdown.write_text(render_markdown(rows, plots, title), encoding="utf-8")
    return Report(markdown, tuple(plots), tuple(rows))


__all__ = [
    "HEAVY_TAIL_RATIO",
    "NOTES",
    "PLOT_NAMES",
    "Comparison",
    "Highlight",
    "Report",
    "Row",
    "baseline",
    "check_record",
    "compare",
    "fronts",
    "highlights",
    "load_records",
    "make_row",
    "make_rows",
    "pareto_front",
    "policy_label",
    "primary_metric",
    "quality",
    "render_markdown",
    "render_tables",
    "tail_note",
    "tail_notes",
    "tail_ratio",
    "task_table",
    "worst_link",
    "write_plots",
    "write_report",
]

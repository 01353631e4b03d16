"""Sweeps: a grid file (TOML) expanded into evaluation points (``grid``), run in parallel into one
resumable results file (``run``). See :mod:`wdmoe.studies.sweep.grid` for the file format."""

from wdmoe.studies.sweep.grid import (
    BANDWIDTH_FIELD,
    GRID_FIELDS,
    Grid,
    PolicyAxes,
    bandwidth_override,
    check_grid,
    describe,
    expand,
    load_grid,
    parse_grid,
    parse_policy,
)
from wdmoe.studies.sweep.run import (
    Job,
    Outcome,
    PointResult,
    Writer,
    default_workers,
    native_top_k,
    plan,
    point_keys,
    run_job,
    run_sweep,
)

__all__ = [
    "BANDWIDTH_FIELD",
    "GRID_FIELDS",
    "Grid",
    "Job",
    "Outcome",
    "PointResult",
    "PolicyAxes",
    "Writer",
    "bandwidth_override",
    "check_grid",
    "default_workers",
    "describe",
    "expand",
    "load_grid",
    "native_top_k",
    "parse_grid",
    "parse_policy",
    "plan",
    "point_keys",
    "run_job",
    "run_sweep",
]

"""Sweeps: a grid file (TOML) expanded into evaluation points, run in parallel, one resumable file.

A grid lists values whose product is swept (policies with their parameter lists, top-k, scenarios,
bandwidths, allocators, seeds, CSI settings) and the scalars every point shares (model, tasks,
limit, data folder, batch size, generation cap, extra scenario overrides)::

    model = "default"
    tasks = ["arc_easy", "piqa"]
    limit = 100
    bandwidths_hz = [10e6, 20e6]
    allocators = ["equal", "minmax"]
    seeds = [0, 1]

    [[policy]]
    name = "topk"

    [[policy]]
    name = "wdmoe"
    theta = [0.05, 0.1, 0.2]     # a list is swept; a single value is fixed

Relative paths (``model``, ``data_dir``) are taken from the working directory, as on the command
line. Everything is validated before anything runs. Points run in worker processes (or Ray tasks), each
keeping its model loaded; the workers return records and the parent alone appends them, so lines
never interleave. A point whose records are all in the results file already is skipped, so a killed
sweep restarted ends with the same file as an uninterrupted one.
"""

import contextlib
import dataclasses
import logging
import os
import tempfile
import tomllib
from collections.abc import Callable, Generator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from functools import cache
from itertools import product
from multiprocessing import get_context
from pathlib import Path
from typing import Any, get_type_hints

from wdmoe.allocation import ALLOCATORS
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.eval.harness import EvalSettings
from wdmoe.eval.results import append_record, completed_keys, config_key
from wdmoe.eval.runner import EvalPoint, Evaluator
from wdmoe.eval.tasks import get_task
from wdmoe.policies import POLICIES, make_policy

BANDWIDTH_FIELD = "cell.bandwidth_hz"
POLICY_KEYS = ("name", "top_k")  # a [[policy]] entry's own keys; the others are the policy's parameters

# --- the grid --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PolicySpec:
    """One [[policy]] entry: its name, each parameter's values (file order), and its own top-k list."""

    name: str
    params: tuple[tuple[str, tuple[Any, ...]], ...] = ()
    top_k: tuple[int, ...] | None = None  # None: the grid's top_k

    def combinations(self) -> list[dict[str, Any]]:
        names = [name for name, _ in self.params]
        return [dict(zip(names, values, strict=True)) for values in product(*(v for _, v in self.params))]


@dataclass(frozen=True)
class Grid:
    """A validated grid: the axes swept (tuples) and the scalars every point shares."""

    tasks: tuple[str, ...]
    policies: tuple[PolicySpec, ...]
    scenarios: tuple[str, ...] = ("paper",)
    bandwidths_hz: tuple[float | None, ...] = (None,)  # None: the scenario's own bandwidth
    allocators: tuple[str, ...] = ("equal",)
    seeds: tuple[int, ...] = (0,)
    top_k: tuple[int | None, ...] = (None,)  # None: the model's own
    csi_delay_blocks: tuple[int, ...] = (0,)
    csi_error_std_db: tuple[float, ...] = (0.0,)
    model: str = "default"
    limit: int | None = None
    data_dir: Path | None = None
    batch_size: int = 16
    max_new_tokens: int = 256
    overrides: tuple[str, ...] = ()


# field → (element type, whether it is a list swept over)
GRID_FIELDS: dict[str, tuple[type, bool]] = {
    "tasks": (str, True),
    "scenarios": (str, True),
    "bandwidths_hz": (float, True),
    "allocators": (str, True),
    "seeds": (int, True),
    "top_k": (int, True),
    "csi_delay_blocks": (int, True),
    "csi_error_std_db": (float, True),
    "overrides": (str, True),
    "model": (str, False),
    "limit": (int, False),
    "data_dir": (str, False),
    "batch_size": (int, False),
    "max_new_tokens": (int, False),
}
KIND_NAMES = {str: "strings", int: "integers", float: "numbers"}
KIND_NAME = {str: "a string", int: "an integer", float: "a number"}


def _is(value: Any, kind: type) -> bool:
    """TOML types: an integer is a number too, a boolean is neither."""
    if isinstance(value, bool):
        return False
    return isinstance(value, (int, float)) if kind is float else isinstance(value, kind)


def _values(where: str, name: str, value: Any, kind: type) -> tuple[Any, ...]:
    """A non-empty list of ``kind`` as a tuple (numbers as floats where floats are asked for)."""
    example = {str: '["a", "b"]', int: "[0, 1]", float: "[1e7, 2e7]"}[kind]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {name} must be a list of {KIND_NAMES[kind]}, e.g. {name} = {example}")
    if not value:
        raise ConfigError(f"{where}: {name} is an empty list; give at least one value or leave it out")
    for v in value:
        if not _is(v, kind):
            raise ConfigError(f"{where}: {name} holds {v!r}; allowed: {KIND_NAMES[kind]} only")
    return tuple(float(v) if kind is float else v for v in value)


def _scalar(where: str, name: str, value: Any, kind: type) -> Any:
    if not _is(value, kind):
        raise ConfigError(f"{where}: {name} = {value!r}; allowed: {KIND_NAME[kind]}")
    return value


def _registered(where: str, name: str, lookup: Callable[[str], Any], value: str) -> Any:
    """``lookup(value)`` (a registry's get); an unknown name's error gets the file and field."""
    try:
        return lookup(value)
    except WdmoeError as e:
        raise ConfigError(f"{where}: {name}: {e}") from e


def _at_least(where: str, name: str, values: Sequence[int], lo: int, note: str = "") -> None:
    for v in values:
        if v < lo:
            raise ConfigError(f"{where}: {name} holds {v}; allowed: integers ≥ {lo}{note}")


def _policy_fields(cls: Any) -> dict[str, Any]:
    """Parameter name → type hint of a dataclass policy ({} when the policy is not a dataclass)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    hints = get_type_hints(cls)
    return {
        f.name: hints.get(f.name) for f in dataclasses.fields(cls) if f.init and f.name not in POLICY_KEYS
    }


def parse_policy(where: str, entry: Any) -> PolicySpec:
    """One [[policy]] entry; every combination of its parameters is built once to validate it."""
    if not isinstance(entry, dict):
        raise ConfigError(f'{where} must be a table, e.g. [[policy]] name = "wdmoe" theta = [0.1, 0.2]')
    name = entry.get("name")
    if not isinstance(name, str):
        raise ConfigError(f"{where}: name is missing; allowed: {', '.join(POLICIES.names())}")
    hints = _policy_fields(_registered(where, "name", POLICIES.get, name))
    params = []
    for param, value in entry.items():
        if param in POLICY_KEYS:
            continue
        if hints and param not in hints:
            allowed = ", ".join(sorted(hints)) or "none"
            raise ConfigError(f"{where}: policy {name!r} has no parameter {param!r}; allowed: {allowed}")
        values = value if isinstance(value, list) else [value]
        if not values:
            raise ConfigError(f"{where}: {param} is an empty list; give at least one value")
        # theta = 0 in TOML is an integer; the record says 0.0 as `wdmoe eval --theta 0` does
        coerce = hints.get(param) is float
        params.append((param, tuple(float(v) if coerce and _is(v, float) else v for v in values)))
    top_k = _values(where, "top_k", entry["top_k"], int) if "top_k" in entry else None
    _at_least(where, "top_k", top_k or (), 1)
    spec = PolicySpec(name, tuple(params), top_k)
    for combo in spec.combinations():
        try:
            make_policy(name, **combo)
        except (TypeError, WdmoeError) as e:
            raise ConfigError(f"{where}: policy {name!r} with {combo}: {e}") from e
    return spec


def parse_grid(data: Mapping[str, Any], where: str = "grid") -> Grid:
    """A grid from TOML data: known keys only, right types, no empty list, registered names."""
    for key in data:
        if key not in GRID_FIELDS and key != "policy":
            allowed = ", ".join(sorted([*GRID_FIELDS, "policy"]))
            raise ConfigError(f"{where}: {key!r} is not a grid field; allowed: {allowed}")
    if "tasks" not in data:
        raise ConfigError(f'{where}: tasks is missing; e.g. tasks = ["arc_easy", "piqa"]')
    entries = data.get("policy")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where}: no policy; add at least one [[policy]] table, e.g. name = "topk"')
    values: dict[str, Any] = {}
    for key, (kind, listed) in GRID_FIELDS.items():
        if key in data:
            read = _values if listed else _scalar
            values[key] = read(where, key, data[key], kind)
    for name in values.get("allocators", ()):
        _registered(where, "allocators", ALLOCATORS.get, name)
    names = (_registered(where, "tasks", get_task, name).name for name in values.pop("tasks"))
    tasks = tuple(dict.fromkeys(names))  # a task listed twice runs once
    _at_least(where, "top_k", values.get("top_k", ()), 1, " (leave top_k out for the model's own)")
    _at_least(where, "seeds", values.get("seeds", ()), 0)
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"]).expanduser()
    policies = tuple(parse_policy(f"{where}: policy #{i}", e) for i, e in enumerate(entries, 1))
    return Grid(tasks=tasks, policies=policies, **values)


def bandwidth_override(bandwidth_hz: float | None) -> tuple[str, ...]:
    """The scenario override that sets the cell bandwidth (none when the scenario's own is kept)."""
    return () if bandwidth_hz is None else (f"{BANDWIDTH_FIELD}={float(bandwidth_hz)!r}",)


def expand(grid: Grid) -> list[EvalPoint]:
    """Every point of ``grid``, in a fixed order: policies (file order) → their parameter combinations
    → top-k → scenarios → bandwidths → allocators → seeds → CSI delays → CSI errors."""
    points = []
    for spec in grid.policies:
        axes = (
            spec.combinations(),
            spec.top_k or grid.top_k,
            grid.scenarios,
            grid.bandwidths_hz,
            grid.allocators,
            grid.seeds,
            grid.csi_delay_blocks,
            grid.csi_error_std_db,
        )
        for params, top_k, scenario, bandwidth, allocator, seed, delay, error_db in product(*axes):
            points.append(
                EvalPoint(
                    model=grid.model,
                    policy=spec.name,
                    params=dict(params),
                    top_k=top_k,
                    scenario=scenario,
                    overrides=grid.overrides + bandwidth_override(bandwidth),
                    allocator=allocator,
                    seed=seed,
                    limit=grid.limit,
                    data_dir=grid.data_dir,
                    batch_size=grid.batch_size,
                    max_new_tokens=grid.max_new_tokens,
                    csi_delay_blocks=delay,
                    csi_error_std_db=error_db,
                )
            )
    return points


def check_grid(grid: Grid, where: str = "grid") -> None:
    """What needs files: the model exists, every scenario resolves with its overrides, every task's
    data loads, the scoring and simulation settings are in range."""
    folder = Path(grid.model).expanduser()
    if grid.model != "default" and not any((folder / f).is_file() for f in ("config.json", "wdmoe.json")):
        raise ConfigError(
            f"{where}: model = {grid.model!r} is not a checkpoint folder (no config.json); "
            "allowed: 'default' or a local model folder"
        )
    try:
        EvalSettings(batch_size=grid.batch_size, max_new_tokens=grid.max_new_tokens)
        for task in grid.tasks:
            get_task(task).load(grid.data_dir, grid.limit)
        for scenario, bandwidth in product(grid.scenarios, grid.bandwidths_hz):
            overrides = grid.overrides + bandwidth_override(bandwidth)
            EvalPoint(model=grid.model, scenario=scenario, overrides=overrides).load_scenario()
        for delay, error_db in product(grid.csi_delay_blocks, grid.csi_error_std_db):
            EvalPoint(csi_delay_blocks=delay, csi_error_std_db=error_db).sim_settings(split_rows=False)
    except WdmoeError as e:
        raise ConfigError(f"{where}: {e}") from e


def load_grid(path: Path) -> Grid:
    """Read, parse and check a grid file; every error names the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    grid = parse_grid(data, where=str(path))
    check_grid(grid, where=str(path))
    return grid


# --- planning: what is already done ---------------------------------------------------------------


@cache
def native_top_k(model: str) -> int | None:
    """The router candidates ``model`` uses when a point gives none, read without loading weights
    (None when its config does not say: then the worker decides and the parent deduplicates)."""
    from transformers import AutoConfig

    from wdmoe.models.default import DEFAULT_TOP_K
    from wdmoe.models.loading import DEFAULT

    path = Path(model).expanduser()
    if model == DEFAULT or (path / "wdmoe.json").is_file():
        return DEFAULT_TOP_K
    try:
        k = getattr(AutoConfig.from_pretrained(path), "num_experts_per_tok", None)
    except (OSError, ValueError):  # loading the checkpoint will say what is wrong with it
        return None
    return int(k) if isinstance(k, int) else None


def point_keys(point: EvalPoint, tasks: Sequence[str]) -> list[str | None]:
    """The record key of each task for ``point`` (None where the model's top-k is not known)."""
    top_k = point.top_k or native_top_k(point.model)
    if top_k is None:
        return [None for _ in tasks]
    config = point.resolved(point.load_scenario(), top_k)
    return [config_key(config, task) for task in tasks]


@dataclass(frozen=True)
class Job:
    """A point to run (its index in the expanded grid) and its tasks not in the results file yet."""

    index: int
    point: EvalPoint
    tasks: tuple[str, ...]


def plan(points: Sequence[EvalPoint], tasks: Sequence[str], out: Path) -> list[Job]:
    """The jobs left: points with a task whose record is not in ``out`` (nor claimed by an earlier
    point of the same key, e.g. a point listed twice)."""
    claimed = completed_keys(out)
    jobs = []
    for i, point in enumerate(points):
        keys = point_keys(point, tasks)
        todo = tuple(t for t, key in zip(tasks, keys, strict=True) if key is None or key not in claimed)
        claimed.update(k for k in keys if k is not None)
        if todo:
            jobs.append(Job(i, point, todo))
    return jobs


# --- running ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What a worker hands back: the point's new records, or the error that stopped it."""

    records: tuple[dict[str, Any], ...] = ()
    error: str | None = None


@cache
def worker_evaluator(threads: int | None) -> Evaluator:
    """This process's evaluator (its model stays loaded between points); set its torch threads once."""
    import torch
    from transformers.utils import logging as hf_logging

    if threads is not None:
        torch.set_num_threads(threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return Evaluator()


def run_job(point: EvalPoint, tasks: tuple[str, ...], threads: int | None = None) -> Outcome:
    """Evaluate ``point`` on ``tasks`` in this process. Nothing is written to the results file: the
    evaluator writes to a scratch file and the records travel back to the parent."""
    try:
        with tempfile.TemporaryDirectory(prefix="wdmoe-sweep-") as scratch:
            records = worker_evaluator(threads).run(point, tasks, Path(scratch) / "records.jsonl")
    except Exception as e:  # any failure is this point's: reported with it, the sweep goes on
        return Outcome(error=f"{type(e).__name__}: {e}")
    return Outcome(records=tuple(records))


def default_workers() -> int:
    return min(2, os.cpu_count() or 1)


Outcomes = Generator[tuple[Job, Outcome], None, None]


def _inline(jobs: Sequence[Job]) -> Outcomes:
    for job in jobs:
        yield job, run_job(job.point, job.tasks)


def _process_pool(jobs: Sequence[Job], workers: int) -> Outcomes:
    """Spawned workers, each with cores // workers torch threads so that they do not oversubscribe."""
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
    try:
        futures: dict[Future[Outcome], Job] = {
            pool.submit(run_job, job.point, job.tasks, threads): job for job in jobs
        }
        for future in as_completed(futures):
            try:
                outcome = future.result()
            except Exception as e:  # the worker process died (killed, out of memory)
                outcome = Outcome(error=f"{type(e).__name__}: {e}")
            yield futures[future], outcome
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray(jobs: Sequence[Job], address: str, workers: int) -> Outcomes:
    """Ray tasks (one CPU, one torch thread each) on the cluster at ``address`` ('auto', 'local' or
    host:port); a Ray already initialised in this process is used as it is."""
    try:
        import ray
    except ImportError as e:
        raise ConfigError("--ray-address needs Ray: pip install 'wdmoe[ray]'") from e
    started = not ray.is_initialized()
    if started:
        try:
            if address == "local":
                ray.init(num_cpus=workers, include_dashboard=False, logging_level=logging.WARNING)
            else:
                ray.init(address=address, logging_level=logging.WARNING)
        except Exception as e:
            raise ConfigError(f"cannot start or reach Ray at --ray-address {address!r}: {e}") from e
    try:
        task: Any = ray.remote(num_cpus=1)(run_job)
        pending = {task.remote(job.point, job.tasks, 1): job for job in jobs}
        while pending:
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            job = pending.pop(ready)
            try:
                outcome = ray.get(ready)
            except Exception as e:  # the Ray worker died or the task was lost
                outcome = Outcome(error=f"{type(e).__name__}: {e}")
            yield job, outcome
    finally:
        if started:
            ray.shutdown()


@dataclass
class Writer:
    """The single writer of the results file: appends each record once (a key already written is
    dropped, so a point that ran twice or a wrong top-k guess never duplicates a line)."""

    out: Path
    written: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.written = completed_keys(self.out)

    def append(self, record: Mapping[str, Any]) -> bool:
        if record["key"] in self.written:
            return False
        append_record(self.out, record)
        self.written.add(str(record["key"]))
        return True


@dataclass(frozen=True)
class PointResult:
    """One finished job as the parent reports it: the records it wrote, or the error."""

    job: Job
    written: int
    error: str | None


def run_sweep(
    jobs: Sequence[Job],
    out: Path,
    workers: int | None = None,
    ray_address: str | None = None,
    on_result: Callable[[PointResult], None] | None = None,
) -> list[PointResult]:
    """Run ``jobs`` (one process when ``workers`` is 1; a spawned pool or Ray otherwise) and append
    their records to ``out`` as they complete; a failing job is reported and the others go on."""
    workers = workers or default_workers()
    if workers < 1:
        raise ConfigError(f"workers must be ≥ 1, got {workers}")
    writer = Writer(Path(out))
    if ray_address is not None:
        outcomes = _ray(jobs, ray_address, workers)
    elif workers == 1 or len(jobs) <= 1:
        outcomes = _inline(jobs)
    else:
        outcomes = _process_pool(jobs, min(workers, len(jobs)))
    results = []
    with contextlib.closing(outcomes):
        for job, outcome in outcomes:
            written = sum(writer.append(r) for r in outcome.records)
            results.append(PointResult(job, written, outcome.error))
            if on_result is not None:
                on_result(results[-1])
    return results


def describe(point: EvalPoint, common: Sequence[str] = ()) -> dict[str, str]:
    """A point's varying settings as short strings (``common`` overrides, shared by all, left out)."""
    params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.params.items())
    overrides = [o for o in point.overrides if o not in common]
    bandwidths = [o.partition("=")[2] for o in overrides if o.startswith(f"{BANDWIDTH_FIELD}=")]
    row = {
        "policy": f"{point.policy} {params}".strip(),
        "top-k": "model's" if point.top_k is None else str(point.top_k),
        "scenario": " ".join([point.scenario, *(o for o in overrides if not o.startswith(BANDWIDTH_FIELD))]),
        "bandwidth": f"{float(bandwidths[-1]) / 1e6:g} MHz" if bandwidths else "scenario's",
        "allocator": point.allocator,
        "seed": str(point.seed),
    }
    if point.csi_delay_blocks or point.csi_error_std_db:
        row["csi"] = f"delay {point.csi_delay_blocks} · error {point.csi_error_std_db:g} dB"
    return row

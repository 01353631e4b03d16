"""Grid files: TOML lists whose product is swept, validated and expanded into evaluation points.

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
line. Everything is validated before anything runs.
"""

import dataclasses
import tomllib
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

from wdmoe.allocation import ALLOCATORS
from wdmoe.config import parse_value
from wdmoe.errors import ConfigError, WdmoeError
from wdmoe.eval.harness import EvalSettings
from wdmoe.eval.tasks import get_task
from wdmoe.policies import POLICIES, make_policy
from wdmoe.simulate import SimSettings
from wdmoe.studies.runner import EvalPoint, PolicySpec

BANDWIDTH_FIELD = "cell.bandwidth_hz"
POLICY_KEYS = ("name", "top_k")  # a [[policy]] entry's own keys; the others are the policy's parameters


@dataclass(frozen=True)
class PolicyAxes:
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
    policies: tuple[PolicyAxes, ...]
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


def field_kind(hint: Any) -> tuple[type, bool]:
    """A :class:`Grid` field's type → (its TOML element type, whether it is a list swept over):
    ``tuple[X, ...]`` is a list of X, ``X | None`` is X, and a Path is written as a string."""
    listed = typing.get_origin(hint) is tuple
    if listed:
        hint = typing.get_args(hint)[0]
    if isinstance(hint, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return (str if hint is Path else hint), listed


# field → (element type, whether it is a list swept over); "policy" tables fill ``policies``
GRID_FIELDS: dict[str, tuple[type, bool]] = {
    name: field_kind(hint) for name, hint in typing.get_type_hints(Grid).items() if name != "policies"
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
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints.get(f.name) for f in dataclasses.fields(cls) if f.init and f.name not in POLICY_KEYS
    }


def parse_policy(where: str, entry: Any) -> PolicyAxes:
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
    spec = PolicyAxes(name, tuple(params), top_k)
    for combo in spec.combinations():
        try:
            make_policy(name, **combo)
        except (TypeError, WdmoeError) as e:
            raise ConfigError(f"{where}: policy {name!r} with {combo}: {e}") from e
    return spec


def _read_fields(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The grid's own keys of ``data``, type-checked (an unknown key or no tasks is an error)."""
    for key in data:
        if key not in GRID_FIELDS and key != "policy":
            allowed = ", ".join(sorted([*GRID_FIELDS, "policy"]))
            raise ConfigError(f"{where}: {key!r} is not a grid field; allowed: {allowed}")
    if "tasks" not in data:
        raise ConfigError(f'{where}: tasks is missing; e.g. tasks = ["arc_easy", "piqa"]')
    values: dict[str, Any] = {}
    for key, (kind, listed) in GRID_FIELDS.items():
        if key in data:
            read = _values if listed else _scalar
            values[key] = read(where, key, data[key], kind)
    return values


def parse_grid(data: Mapping[str, Any], where: str = "grid") -> Grid:
    """A grid from TOML data: known keys only, right types, no empty list, registered names."""
    values = _read_fields(data, where)
    entries = data.get("policy")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f'{where}: no policy; add at least one [[policy]] table, e.g. name = "topk"')
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
    scoring = EvalSettings(batch_size=grid.batch_size, max_new_tokens=grid.max_new_tokens)
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
            sim = SimSettings(
                allocator=allocator, seed=seed, csi_delay_blocks=delay, csi_error_std_db=error_db
            )
            points.append(
                EvalPoint(
                    model=grid.model,
                    policy=PolicySpec(spec.name, dict(params), top_k),
                    scenario=scenario,
                    overrides=grid.overrides + bandwidth_override(bandwidth),
                    sim=sim,
                    scoring=scoring,
                    limit=grid.limit,
                    data_dir=grid.data_dir,
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
            SimSettings(csi_delay_blocks=delay, csi_error_std_db=error_db)
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


def megahertz(text: str) -> str:
    """An override's bandwidth value in MHz (``10000000.0`` → "10 MHz"; not a number: as written)."""
    value = parse_value(text)
    return f"{value / 1e6:g} MHz" if isinstance(value, int | float) else text


def describe(point: EvalPoint, common: Sequence[str] = ()) -> dict[str, str]:
    """A point's varying settings as short strings (``common`` overrides, shared by all, left out)."""
    policy, sim = point.policy, point.sim
    params = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in policy.params.items())
    overrides = [o for o in point.overrides if o not in common]
    bandwidths = [o.partition("=")[2] for o in overrides if o.startswith(f"{BANDWIDTH_FIELD}=")]
    row = {
        "policy": f"{policy.name} {params}".strip(),
        "top-k": "model's" if policy.top_k is None else str(policy.top_k),
        "scenario": " ".join([point.scenario, *(o for o in overrides if not o.startswith(BANDWIDTH_FIELD))]),
        "bandwidth": megahertz(bandwidths[-1]) if bandwidths else "scenario's",
        "allocator": sim.allocator,
        "seed": str(sim.seed),
    }
    if sim.csi_delay_blocks or sim.csi_error_std_db:
        row["csi"] = f"delay {sim.csi_delay_blocks} · error {sim.csi_error_std_db:g} dB"
    return row

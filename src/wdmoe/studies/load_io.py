"""Load records in a JSON Lines results file: one :class:`~wdmoe.serving.load.LoadRecord` a line,
appended durably as each request ends, so that a rerun skips the (face, λ, request) already there.
A line cut short by a crash is dropped on reading and cut off before the next append
(:mod:`wdmoe.eval.results`)."""

from collections.abc import Iterable, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from wdmoe.errors import ConfigError
from wdmoe.eval.results import append_record, read_records
from wdmoe.serving.load import LoadRecord

FIELDS = {f.name for f in fields(LoadRecord)}
REQUIRED = {"face", "rate_per_s", "request", "arrival_s", "ttft_s", "finished_s", "new_tokens", "status"}


def record_to_json(record: LoadRecord) -> dict[str, Any]:
    return {"kind": "load", **asdict(record), "config": dict(record.config)}


def record_from_json(obj: Mapping[str, Any], where: str) -> LoadRecord:
    """A LoadRecord from its JSON object; ConfigError naming ``where`` and the missing fields."""
    missing = REQUIRED - obj.keys()
    if missing:
        raise ConfigError(f"{where} is not a load record: it lacks {', '.join(sorted(missing))}")
    try:
        return LoadRecord(**{k: v for k, v in obj.items() if k in FIELDS})
    except (TypeError, ConfigError) as e:
        raise ConfigError(f"{where} is not a valid load record: {e}") from e


def read_load_records(path: Path) -> list[LoadRecord]:
    """Every complete load record of ``path`` ([] when it does not exist)."""
    return [record_from_json(obj, f"{path}: record {i}") for i, obj in enumerate(read_records(path), 1)]


def append_load_record(path: Path, record: LoadRecord) -> None:
    """Append ``record`` as one line (flushed and synced)."""
    append_record(Path(path), record_to_json(record))


def done_keys(path: Path) -> set[tuple[str, str, float | None, int]]:
    """(face, configuration, λ, request) of the records already in ``path``: what a rerun of the
    same setting skips."""
    return {r.key for r in read_load_records(path)}


def is_load_file(path: Path) -> bool:
    """Whether ``path`` holds load records (judged by its first complete record)."""
    records = read_records(Path(path))
    return bool(records) and records[0].get("kind") == "load"


def read_load_files(paths: Iterable[Path]) -> list[LoadRecord]:
    """The records of several results files, in order."""
    return [r for p in paths for r in read_load_records(p)]

"""Benchmark tasks read from llm-foundry style JSONL files (see ../shared/benchmarks/README.md)."""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from wdmoe.errors import ConfigError, ModelNotFoundError


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: score each ``continuations[i]`` after ``context``."""

    context: str
    continuations: tuple[str, ...]
    gold: int


def default_data_dir() -> Path:
    """``$WDMOE_DATA`` or ../shared/benchmarks beside the repository."""
    env = os.environ.get("WDMOE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "benchmarks"


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise ModelNotFoundError(f"data file {path} does not exist (set --data-dir or WDMOE_DATA)")
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{n}: not valid JSON ({err.msg})") from err
    return rows


def query_choice_items(path: Path, limit: int | None = None) -> list[ChoiceItem]:
    """Rows with query/choices/gold, formatted as lm-eval does: "Question: …\\nAnswer:" + " choice"."""
    items = []
    for row in read_jsonl(path)[:limit]:
        query = row["query"].strip()
        if not query.startswith("Question:"):
            query = f"Question: {query}"
        items.append(
            ChoiceItem(f"{query}\nAnswer:", tuple(f" {c}" for c in row["choices"]), int(row["gold"]))
        )
    return items

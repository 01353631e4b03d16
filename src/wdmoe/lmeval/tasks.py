"""Offline lm-eval tasks over the local llm-foundry JSONL files (../shared/benchmarks/README.md).

lm-eval's own ``arc_easy`` / ``piqa`` download from the Hugging Face hub; these read the local
files through HF datasets' packaged ``json`` builder instead, with the prompts of lm-eval's tasks:
"Question: {question}\\nAnswer:" and each choice after lm-eval's target delimiter " " (the files'
queries already start with "Question: "; PIQA's end with a newline, stripped as lm-eval's goal
has none). :func:`write_tasks` writes one YAML per task into a folder passed to lm-eval as
``--include_path`` (or ``TaskManager(include_path=...)``, see :func:`local_task_manager`).
"""

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from wdmoe.errors import ModelNotFoundError
from wdmoe.eval.tasks import default_data_dir

log = logging.getLogger(__name__)

OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
TAG = "wdmoe"  # every task below; ``--tasks wdmoe`` runs them all

# lm-eval's ARC / PIQA prompt "Question: {{question}}\nAnswer:" from the files' `query` field.
QUESTION_ANSWER = (
    "{% set q = query.strip() %}{% if not q.startswith('Question:') %}Question: {% endif %}{{ q }}\nAnswer:"
)


@dataclass(frozen=True)
class LocalTask:
    """An lm-eval task ``name`` reading ``file`` of the data folder, prompted as lm-eval's ``like``."""

    name: str
    file: str
    like: str

    def config(self, data_dir: Path) -> dict[str, Any]:
        """The task's lm-eval YAML content (a multiple-choice task scored by acc and acc_norm)."""
        return {
            "task": self.name,
            "tag": [TAG],
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str((data_dir / self.file).resolve())}},
            "output_type": "multiple_choice",
            "test_split": "test",
            "doc_to_text": QUESTION_ANSWER,
            "doc_to_target": "gold",
            "doc_to_choice": "choices",
            "target_delimiter": " ",
            "metric_list": [
                {"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")
            ],
            "metadata": {"version": 1.0, "prompt_of": self.like, "source": self.file},
        }


LOCAL_TASKS = (
    LocalTask("wdmoe_arc_easy", "arc_easy.jsonl", "arc_easy"),
    LocalTask("wdmoe_arc_challenge", "arc_challenge.jsonl", "arc_challenge"),
    LocalTask("wdmoe_piqa", "piqa.jsonl", "piqa"),
)


def go_offline() -> None:
    """Keep HF datasets / the hub off the network (unless the environment already says otherwise).

    The libraries read these variables when imported, so modules already imported are updated too.
    """
    for name in OFFLINE_ENV:
        os.environ.setdefault(name, "1")
    offline = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    for module, names in (
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
        ("datasets.config", ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")),
    ):
        if module in sys.modules:
            for name in names:
                setattr(sys.modules[module], name, offline)


def write_tasks(folder: Path, data_dir: Path | None = None) -> list[str]:
    """Write a YAML per local task whose file is in ``data_dir`` into ``folder``; the task names.

    ``data_dir`` defaults to :func:`wdmoe.eval.tasks.default_data_dir` ($WDMOE_DATA or
    ../shared/benchmarks). A task whose file is missing is skipped (logged); none raises.
    """
    data_dir = (data_dir or default_data_dir()).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for task in LOCAL_TASKS:
        if not (data_dir / task.file).is_file():
            log.info("%s: no %s in %s, task not written", task.name, task.file, data_dir)
            continue
        text = yaml.safe_dump(task.config(data_dir), sort_keys=False, allow_unicode=True)
        (folder / f"{task.name}.yaml").write_text(text, encoding="utf-8")
        names.append(task.name)
    if not names:
        files = ", ".join(t.file for t in LOCAL_TASKS)
        raise ModelNotFoundError(
            f"none of {files} is in {data_dir}; point $WDMOE_DATA (or data_dir) at the benchmark folder"
        )
    return names


def local_task_manager(folder: Path, data_dir: Path | None = None, include_defaults: bool = True) -> Any:
    """An lm-eval TaskManager that knows the local tasks (written into ``folder``), offline.

    ``include_defaults=False`` leaves out lm-eval's own tasks, whose index takes ~10 s to build.
    """
    go_offline()
    write_tasks(folder, data_dir)
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(folder), include_defaults=include_defaults)

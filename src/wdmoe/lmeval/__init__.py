"""lm-eval (EleutherAI lm-evaluation-harness) integration: the model ``wdmoe`` and offline tasks.

Importing this package registers ``wdmoe`` in lm-eval's model registry. lm-eval 0.4.13 has no
plugin entry points for models, so a bare ``lm_eval --model wdmoe`` cannot find it: use
``python -m wdmoe.lmeval`` (the same arguments; it registers the model, writes the offline tasks
``wdmoe_arc_easy`` / ``wdmoe_arc_challenge`` / ``wdmoe_piqa`` and runs lm-eval's own CLI), or, from
Python, ``import wdmoe.lmeval`` before ``lm_eval.simple_evaluate(model="wdmoe", …)``.
Needs the ``lmeval`` extra: ``pip install 'wdmoe[lmeval]'``.
"""

from wdmoe.lmeval.tasks import LOCAL_TASKS, go_offline, local_task_manager, write_tasks

go_offline()  # before lm-eval imports HF datasets, which reads the offline switch once

try:
    from wdmoe.lmeval.adapter import ModelArgs, WdmoeLM, parse_model_args
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"wdmoe.lmeval needs lm-eval: pip install 'wdmoe[lmeval]' ({e})") from e

__all__ = [
    "LOCAL_TASKS",
    "ModelArgs",
    "WdmoeLM",
    "go_offline",
    "local_task_manager",
    "parse_model_args",
    "write_tasks",
]

"""Evaluation: tasks, scoring and metrics.

Importing any ``wdmoe.eval`` module registers the built-in tasks (``formats``) in ``TASKS``.
"""

from wdmoe.eval import formats as formats

"""Evaluation: tasks, scoring and metrics."""

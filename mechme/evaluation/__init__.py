"""Benchmark evaluation on data shipped in PyPI packages, with and without an intervention.

`evaluate` runs one task (see `TASKS`) and returns its metrics with bootstrap
confidence intervals. Given an intervention, it also runs the baseline on the same
items and adds a paired test.
"""

from mechme.evaluation.tasks import SPLITS, TASKS, evaluate, format_markdown, format_result, get_task

__all__ = ["SPLITS", "TASKS", "evaluate", "format_markdown", "format_result", "get_task"]

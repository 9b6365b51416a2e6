"""GLUE: task registry, data (TSV and Hub), metrics and leaderboard submissions.

Metric definitions follow GLUE (Wang et al. 2019). The metrics are also an offline
``evaluate`` module: ``evaluate.load(GLUE_METRIC_PATH, "sst2")``.
"""

from pathlib import Path

from .data import label_mapping, load_glue_from_hub, load_glue_split, read_glue_tsv, tokenize_glue
from .metrics import compute_metrics, glue_score
from .submission import write_submission
from .tasks import TASKS, GlueTask, get_task, leaderboard_entry

GLUE_METRIC_PATH = str(Path(__file__).resolve().parent / "glue_metric")
"""Folder of the local ``evaluate`` module (``evaluate.load(GLUE_METRIC_PATH, task)``)."""

__all__ = [
    "GLUE_METRIC_PATH",
    "GlueTask",
    "TASKS",
    "compute_metrics",
    "get_task",
    "glue_score",
    "label_mapping",
    "leaderboard_entry",
    "load_glue_from_hub",
    "load_glue_split",
    "read_glue_tsv",
    "tokenize_glue",
    "write_submission",
]

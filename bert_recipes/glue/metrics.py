"""GLUE metrics, offline (numpy + scipy).

Metric definitions follow GLUE (Wang et al. 2019) and its reference implementation
(scikit-learn / scipy, as in the ``glue`` metric of ``evaluate``):

=========================  =====================================================
task                       keys returned by :func:`compute_metrics`
=========================  =====================================================
cola, ax                   ``matthews_correlation`` (multi-class MCC for AX)
sst2, qnli, rte, wnli      ``accuracy``
mrpc, qqp                  ``f1`` (F1 of the positive class 1), ``accuracy``
stsb                       ``pearson``, ``spearmanr`` (on float predictions)
mnli                       ``accuracy_m`` (split ``validation_matched``) or
                           ``accuracy_mm`` (split ``validation_mismatched``);
                           plain ``accuracy`` when no split is given
=========================  =====================================================

All values are fractions (accuracy 0.875, not 87.5).

Degenerate inputs never raise:

* MCC is 0.0 when its denominator is 0 (e.g. all predictions in one class), as in
  scikit-learn.
* F1 is 0.0 when there are no true positives, false positives and false negatives at all
  (no positive predictions and no positive references), as ``zero_division=0``.
* Pearson and Spearman are 0.0 (no measurable correlation) when the predictions or the
  references are constant, where scipy would return nan.
* Non-finite STS-B predictions give nan for both correlations.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import numpy as np

from ..errors import DataError, UserError
from .tasks import GlueTask, get_task


# --------------------------------------------------------------------------- inputs


def to_numpy(values: Any) -> np.ndarray:
    """A numpy array from a list, numpy array or (CPU/GPU, any float dtype) torch tensor."""
    if hasattr(values, "detach"):  # torch.Tensor, without importing torch
        values = values.detach().cpu()
        if str(values.dtype) in ("torch.bfloat16", "torch.float16"):
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


def class_predictions(predictions: Any, num_labels: int) -> np.ndarray:
    """Class ids [N] from logits [N, num_labels] (argmax) or class ids [N].

    Raises:
        DataError: wrong shape, non-integer ids, or ids outside ``[0, num_labels)``.
    """
    array = to_numpy(predictions)
    if array.ndim == 2:
        if array.shape[1] != num_labels:
            raise DataError(f"predictions have shape {tuple(array.shape)}; expected logits [N, {num_labels}] or class ids [N]")
        return array.argmax(axis=-1).astype(np.int64)
    if array.ndim != 1:
        raise DataError(f"predictions have shape {tuple(array.shape)}; expected logits [N, {num_labels}] or class ids [N]")
    return _class_ids(array, num_labels, "predictions")


def _class_ids(array: np.ndarray, num_labels: int, what: str) -> np.ndarray:
    if array.dtype.kind not in "iuf":
        raise DataError(f"{what} must be integer class ids, got dtype {array.dtype}")
    if array.size and not np.all(np.isfinite(array.astype(np.float64)) & (array == np.round(array))):
        raise DataError(f"{what} must be integer class ids, got values like {array[:3].tolist()}")
    ids = array.astype(np.int64)
    if what == "references" and np.any(ids == -1):
        raise DataError("references contain -1 (hidden test labels); metrics need a labelled split")
    bad = ids[(ids < 0) | (ids >= num_labels)]
    if bad.size:
        raise DataError(f"{what} contain class id {int(bad[0])}; expected ids in [0, {num_labels - 1}]")
    return ids


def regression_predictions(predictions: Any) -> np.ndarray:
    """Float predictions [N] from [N] or [N, 1].

    Raises:
        DataError: any other shape.
    """
    array = to_numpy(predictions)
    if array.dtype.kind not in "iuf":
        raise DataError(f"predictions must be numbers, got dtype {array.dtype}")
    array = array.astype(np.float64)
    if array.ndim == 2 and array.shape[1] == 1:
        array = array[:, 0]
    if array.ndim != 1:
        raise DataError(f"predictions have shape {tuple(array.shape)}; expected scores [N] or [N, 1]")
    return array


# --------------------------------------------------------------------------- metrics


def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    """Fraction of ``predictions`` equal to ``references`` (class ids [N])."""
    return float(np.mean(predictions == references))


def f1_positive(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of the positive class 1: ``2 TP / (2 TP + FP + FN)``; 0.0 when that is 0 / 0."""
    tp = int(np.sum((predictions == 1) & (references == 1)))
    fp = int(np.sum((predictions == 1) & (references != 1)))
    fn = int(np.sum((predictions != 1) & (references == 1)))
    denominator = 2 * tp + fp + fn
    return 2 * tp / denominator if denominator else 0.0


def matthews_correlation(predictions: np.ndarray, references: np.ndarray, num_labels: int) -> float:
    """Matthews correlation coefficient, multi-class (Gorodkin 2004; = scikit-learn's).

    With the confusion matrix C (rows: references, columns: predictions), t = row sums,
    p = column sums, c = trace, s = N:
    ``(c s - t.p) / sqrt((s^2 - p.p) (s^2 - t.t))``; 0.0 when the denominator is 0.
    """
    confusion = np.zeros((num_labels, num_labels), dtype=np.float64)
    np.add.at(confusion, (references, predictions), 1.0)
    t = confusion.sum(axis=1)
    p = confusion.sum(axis=0)
    c = np.trace(confusion)
    s = confusion.sum()
    denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def _correlations(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    from scipy.stats import pearsonr, spearmanr

    if not np.all(np.isfinite(predictions)):
        return {"pearson": math.nan, "spearmanr": math.nan}
    if len(predictions) < 2 or np.ptp(predictions) == 0 or np.ptp(references) == 0:
        return {"pearson": 0.0, "spearmanr": 0.0}
    return {
        "pearson": float(pearsonr(predictions, references)[0]),
        "spearmanr": float(spearmanr(predictions, references)[0]),
    }


# --------------------------------------------------------------------------- per task


def _split_metric(task: GlueTask, split: str) -> str:
    """The metric key of a dev split for a task with several (``task.split_metrics``):
    ``validation_matched``, ``dev_matched``, ``matched``, ``m`` or ``mnli_m`` -> ``accuracy_m``."""
    short = split.strip().lower().replace("-", "_").removeprefix(f"{task.name}_")
    for canonical, key in task.split_metrics.items():
        if short in (canonical.split("_", 1)[1], key.split("_", 1)[1]):
            return key
    names = " or ".join(canonical.split("_", 1)[1] for canonical in task.split_metrics)
    try:
        canonical = task.canonical_split(split)
    except UserError:
        canonical = None
    if canonical not in task.split_metrics:
        raise UserError(f"{task.name.upper()} metrics need a {names} split, got '{split}'")
    return task.split_metrics[canonical]


def compute_metrics(
    task: "str | GlueTask", predictions: Any, references: Any, split: Optional[str] = None
) -> dict[str, float]:
    """GLUE metrics of one task on one labelled split.

    Args:
        task: task name or :class:`GlueTask`.
        predictions: classification: logits [N, num_labels] or class ids [N];
            STS-B: scores [N] or [N, 1]. Lists, numpy arrays or torch tensors.
        references: gold class ids [N] (STS-B: scores [N]); never ``-1``.
        split: only read for MNLI: ``validation_matched`` -> key ``accuracy_m``,
            ``validation_mismatched`` -> ``accuracy_mm`` (also ``dev_matched``, ``matched``,
            ``m``, ...); without it MNLI returns ``accuracy``.

    Returns:
        ``{metric key: value}`` as Python floats (keys in the module doc).

    Raises:
        DataError: mismatched lengths, no examples, bad shapes, hidden (-1) references or
            class ids out of range. UserError: unknown task or split.
    """
    task = get_task(task)
    refs = to_numpy(references)
    if refs.ndim != 1:
        raise DataError(f"references have shape {tuple(refs.shape)}; expected [N]")
    if task.is_regression:
        preds = regression_predictions(predictions)
        if refs.dtype.kind not in "iuf":
            raise DataError(f"references must be scores, got dtype {refs.dtype}")
        refs = refs.astype(np.float64)
        if np.any(refs == -1):
            raise DataError("references contain -1 (hidden test labels); metrics need a labelled split")
    else:
        preds = class_predictions(predictions, task.num_labels)
        refs = _class_ids(refs, task.num_labels, "references")
    if len(preds) != len(refs):
        raise DataError(f"{len(preds)} predictions but {len(refs)} references")
    if not len(refs):
        raise DataError(f"no examples to score for GLUE task '{task.name}'")

    if task.is_regression:
        return _correlations(preds, refs)
    if "matthews_correlation" in task.metrics:
        return {"matthews_correlation": matthews_correlation(preds, refs, task.num_labels)}
    if "f1" in task.metrics:
        return {"f1": f1_positive(preds, refs), "accuracy": accuracy(preds, refs)}
    key = _split_metric(task, split) if task.split_metrics and split is not None else "accuracy"
    return {key: accuracy(preds, refs)}


def comparable(value) -> float:
    """A main-metric value for ``>``: None and nan rank below everything."""
    if value is None or not math.isfinite(float(value)):
        return -math.inf
    return float(value)


def task_score(task: "str | GlueTask", metrics: Mapping[str, float]) -> list[float]:
    """The leaderboard entries of one task's results.

    One entry per task: the mean of its metrics (MRPC, QQP: f1 and accuracy; STS-B:
    pearson and spearmanr); MNLI gives two entries, ``accuracy_m`` and ``accuracy_mm``.

    Raises:
        UserError: a metric of the task is missing.
    """
    task = get_task(task)
    missing = [key for key in task.metrics if key not in metrics]
    if missing:
        raise UserError(f"GLUE results for '{task.name}' lack '{missing[0]}' (expected: {', '.join(task.metrics)})")
    values = [float(metrics[key]) for key in task.metrics]
    if len(task.entry_names) > 1:  # one leaderboard column per metric (MNLI-m, MNLI-mm)
        return values
    return [sum(values) / len(values)]


def glue_score(results: Mapping[str, Mapping[str, float]]) -> float:
    """The GLUE score: the average of the leaderboard entries of the tasks in ``results``.

    Args:
        results: ``{task name: {metric key: value}}`` as from :func:`compute_metrics`
            (MNLI: one dict with ``accuracy_m`` and ``accuracy_mm``).

    Returns:
        The mean over entries, in the unit of the inputs: a task with two metrics counts
        their mean once, MNLI-m and MNLI-mm count as two entries (as on the leaderboard).
        AX is a diagnostic and is left out. nan if any value is nan.

    Raises:
        UserError: no scored task, an unknown or repeated task, or a missing metric.
    """
    entries: list[float] = []
    seen: set[str] = set()
    for name, metrics in results.items():
        task = get_task(name)
        if task.name in seen:
            raise UserError(f"GLUE results name task '{task.name}' twice")
        seen.add(task.name)
        if task.scored:
            entries.extend(task_score(task, metrics))
    if not entries:
        raise UserError("GLUE results have no scored task (AX alone does not count)")
    return sum(entries) / len(entries)


__all__ = [
    "accuracy",
    "class_predictions",
    "compute_metrics",
    "f1_positive",
    "glue_score",
    "matthews_correlation",
    "regression_predictions",
    "task_score",
    "to_numpy",
]

"""GLUE leaderboard submission files (gluebenchmark.com) and their zip.

One TSV per test set, named as the leaderboard expects (``CoLA.tsv``, ``SST-2.tsv``,
``MRPC.tsv``, ``STS-B.tsv``, ``QQP.tsv``, ``MNLI-m.tsv``, ``MNLI-mm.tsv``, ``QNLI.tsv``,
``RTE.tsv``, ``WNLI.tsv``, ``AX.tsv``), with the header ``index<TAB>prediction`` and one
row per test example, sorted by index. Predictions are written as the GLUE TSVs write
labels (``task.tsv_labels``): ``0``/``1`` for CoLA, SST-2, MRPC, QQP and WNLI;
``entailment``/``not_entailment`` for QNLI and RTE; ``entailment``/``neutral``/
``contradiction`` for MNLI and AX; STS-B scores clipped to [0, 5] with 3 decimals.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..atomic import replacing, write_text
from ..errors import DataError, UserError
from .metrics import to_numpy, class_predictions, regression_predictions
from .tasks import GlueTask, leaderboard_entry

SUBMISSION_ZIP = "submission.zip"


def format_predictions(task: GlueTask, values: Any) -> list[str]:
    """Leaderboard strings for one task's predictions.

    Args:
        task: the task whose labels are written (AX: MNLI's labels).
        values: class ids [N] or logits [N, C]; STS-B: scores [N] or [N, 1].

    Raises:
        DataError: bad shape, class id out of range, or a non-finite STS-B score.
    """
    if task.is_regression:
        scores = regression_predictions(values)
        if not np.all(np.isfinite(scores)):
            raise DataError(f"{task.name} predictions contain non-finite scores")
        return [f"{score:.3f}" for score in np.clip(scores, 0.0, 5.0)]
    return [task.tsv_labels[i] for i in class_predictions(values, task.num_labels)]


def _rows(name: str, task: GlueTask, indices: Sequence[int], values: Any) -> list[tuple[int, str]]:
    index = to_numpy(indices)
    if index.ndim != 1 or (index.size and index.dtype.kind not in "iu"):
        raise DataError(f"submission '{name}': indices must be integers [N], got shape {tuple(index.shape)} dtype {index.dtype}")
    labels = format_predictions(task, values)
    if len(labels) != len(index):
        raise DataError(f"submission '{name}': {len(index)} indices but {len(labels)} predictions")
    if not len(index):
        raise DataError(f"submission '{name}': no predictions")
    if len(np.unique(index)) != len(index):
        raise DataError(f"submission '{name}': repeated index values")
    return sorted(zip((int(i) for i in index), labels))


def write_submission(predictions: Mapping[str, tuple[Sequence[int], Any]], out_dir: "str | os.PathLike") -> Path:
    """Write leaderboard TSVs and zip them.

    Args:
        predictions: ``{entry: (indices, values)}``. An entry is a task name or alias
            (``"rte"``, ``"SST-2"``, ``"ax"``); MNLI's two test sets are ``"mnli-m"`` and
            ``"mnli-mm"`` (also ``"mnli_matched"``, ``"mnli_mismatched"``). ``indices`` are the
            test split's ``idx`` column [N]; ``values`` are class ids [N] or logits [N, C]
            (STS-B: scores [N]).
        out_dir: folder for the TSVs and ``submission.zip`` (created if needed).

    Returns:
        The path of ``out_dir/submission.zip``, holding the TSVs at its root.

    Raises:
        UserError: unknown entry, an entry given twice, or nothing to write.
        DataError: malformed indices or predictions.
    """
    if not predictions:
        raise UserError("no predictions to write into a GLUE submission")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for name, pair in predictions.items():
        task, split = leaderboard_entry(name)
        file_name = task.leaderboard_files[split]
        if file_name in written:
            raise UserError(f"submission entry '{name}' writes {file_name}, already written by another entry")
        try:
            indices, values = pair
        except (TypeError, ValueError):
            raise UserError(f"submission entry '{name}': expected a pair (indices, predictions)") from None
        rows = _rows(name, task, indices, values)
        written[file_name] = write_text(out / file_name, "index\tprediction\n" + "".join(f"{i}\t{label}\n" for i, label in rows))
    target = out / SUBMISSION_ZIP
    with replacing(target) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for file_name, path in sorted(written.items()):
            archive.write(path, arcname=file_name)
    return target


__all__ = ["SUBMISSION_ZIP", "format_predictions", "write_submission"]

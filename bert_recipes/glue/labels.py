"""GLUE label names: matching a checkpoint's ``id2label`` to a task's labels by name."""

from __future__ import annotations

import re
from typing import Any, Mapping, Optional

from ..errors import UserError
from .tasks import GlueTask, get_task

_GENERIC = re.compile(r"^label_\d+$")


def norm_label(name: Any) -> str:
    """A label name compared case-insensitively, with ``-`` and spaces as ``_``."""
    return re.sub(r"[\s\-]+", "_", str(name).strip().lower())


def label_mapping(task: "str | GlueTask", model_config: Any) -> Optional[dict[int, int]]:
    """Reconcile a checkpoint's ``id2label`` with the task's labels, by name.

    Args:
        task: the GLUE task.
        model_config: a ``PretrainedConfig`` (its ``id2label`` is read) or an ``id2label``
            mapping itself; ``None`` means no label names.

    Returns:
        ``None`` when the task's ids can be used as they are: the checkpoint has no names,
        generic ``LABEL_0``.. names (a fresh head), the task's names in the task's order,
        or the task is the STS-B regression with a 1-output head. Otherwise
        ``{task id: checkpoint id}`` when the checkpoint has the task's names in another
        order (names compare case-insensitively, ``-``/space = ``_``; the TSV spelling,
        e.g. ``"0"``/``"1"``, also counts).

    Raises:
        UserError: the names conflict (different names or a different number of classes).
    """
    task = get_task(task)
    id2label = getattr(model_config, "id2label", model_config)
    if not id2label:
        return None
    if not isinstance(id2label, Mapping):
        raise UserError(f"model config id2label must be a mapping, got {type(id2label).__name__}")
    try:
        ordered = [id2label[key] for key in sorted(id2label, key=int)]
    except (TypeError, ValueError):
        raise UserError(f"model config id2label has non-integer ids: {sorted(map(str, id2label))}") from None
    names = [norm_label(name) for name in ordered]
    if all(_GENERIC.match(name) for name in names):
        return None
    shown = ", ".join(map(str, ordered))
    if task.is_regression:
        if len(names) == 1:
            return None
        raise UserError(
            f"checkpoint labels ({shown}) are classes, but GLUE task '{task.name}' is a regression "
            "(1 output); start from a checkpoint without a task head"
        )
    for spelling in (task.label_names, task.tsv_labels):
        wanted = [norm_label(name) for name in spelling]
        if sorted(names) == sorted(wanted) and len(set(names)) == len(names):
            if names == wanted:
                return None
            return {task_id: names.index(name) for task_id, name in enumerate(wanted)}
    raise UserError(
        f"checkpoint labels ({shown}) do not match GLUE task '{task.name}' labels "
        f"({', '.join(task.label_names)}); start from a checkpoint without a task head"
    )


__all__ = ["label_mapping", "norm_label"]

"""GLUE data: the original TSV layout, the Hub dataset, featurisation and label mapping.

Every split, whatever its source, becomes a :class:`datasets.Dataset` with the columns

* ``idx`` (int32): the test file's ``index`` (QQP: ``id``) column, which leaderboard
  files must repeat; for train/dev, the 0-based row number (as in ``nyu-mll/glue``);
* the task's text columns (``task.text_columns``, Hub names, str; empty strings allowed);
* ``label``: class id (``ClassLabel`` with ``task.label_names``), a float32 score in [0, 5]
  for STS-B, or ``-1`` when the split is unlabelled (test sets, AX). ``-1`` is never a
  target: :func:`tokenize_glue` drops the ``labels`` column of an unlabelled split.

The TSV reader follows the files written by ``download_glue_data.py``: tab-separated,
read with ``csv.QUOTE_NONE`` (sentences contain bare ``"`` characters; with quoting on,
rows silently merge) and ``utf-8-sig`` (MRPC's header starts with a BOM). CoLA train/dev
have no header (source, label, original label, sentence). Labels are converted by NAME
(``task.tsv_labels``), see :mod:`bert_recipes.glue.tasks` for the conventions.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Any

from ..errors import DataError, UserError, first_line
from .labels import label_mapping, norm_label
from .tasks import GlueTask, get_task

HIDDEN_LABEL = -1
"""The ``label`` of an example whose gold label is not public (test sets)."""

_INDEX_COLUMNS = ("index", "id")  # QQP's files call the index column "id"


def glue_features(task: "str | GlueTask"):
    """The :class:`datasets.Features` of a GLUE split of ``task``."""
    import datasets

    task = get_task(task)
    columns = {"idx": datasets.Value("int32")}
    columns.update({name: datasets.Value("string") for name in task.text_columns})
    if task.is_regression:
        columns["label"] = datasets.Value("float32")
    else:
        columns["label"] = datasets.ClassLabel(names=list(task.label_names))
    return datasets.Features(columns)


# --------------------------------------------------------------------------- TSV reader


def _header(reader, path: Path, task: GlueTask, split: str) -> list[str]:
    if split in task.headerless_splits:
        return list(task.headerless_columns)
    try:
        header = next(reader)
    except StopIteration:
        raise DataError(f"{path}: file is empty; expected a header row") from None
    return [name.strip() for name in header]


def _column(header: list[str], name: str, path: Path) -> int:
    if name not in header:
        raise DataError(f"{path}: missing column '{name}'; header has: {', '.join(header)}")
    return header.index(name)


def _parse_label(value: str, task: GlueTask, path: Path, line: int) -> "int | float":
    value = value.strip()
    if task.is_regression:
        try:
            score = float(value)
        except ValueError:
            score = math.nan
        if not 0.0 <= score <= 5.0:
            raise DataError(f"{path}: line {line}: score '{value}' is not a number in [0, 5]")
        return score
    if value not in task.tsv_labels:
        raise DataError(
            f"{path}: line {line}: label '{value}' is not one of {', '.join(task.tsv_labels)} (task {task.name})"
        )
    return task.tsv_labels.index(value)


def _index_position(header: list[str], task: GlueTask, split: str, path: Path) -> int | None:
    """The column of a test split's ``index`` (None elsewhere: rows are numbered)."""
    if split not in task.test_splits:
        return None
    present = [name for name in _INDEX_COLUMNS if name in header]
    return _column(header, present[0] if present else "index", path)


def _row_index(value: str, path: Path, line: int) -> int:
    try:
        return int(value)
    except ValueError:
        raise DataError(f"{path}: line {line}: index '{value}' is not an integer") from None


def read_glue_tsv(path: "str | os.PathLike", task: "str | GlueTask", split: str):
    """Read one GLUE TSV file into a :class:`datasets.Dataset` (columns in the module doc).

    Args:
        path: the TSV file, e.g. ``glue_data/SST-2/dev.tsv``.
        task: task name or :class:`GlueTask`.
        split: split name (``train``, ``validation``/``dev``, ``test``, MNLI's
            ``validation_matched`` ...); decides header, label and index handling.

    Raises:
        DataError: one line naming the file: missing/unreadable file, a missing column,
            a row with the wrong number of fields, a label outside the task's label set
            (with its line number and value), or a non-integer index.
    """
    import datasets

    task = get_task(task)
    split = task.canonical_split(split)
    path = Path(path)
    labelled = split not in task.test_splits and task.tsv_label_column is not None
    idx, label = [], []
    texts: dict[str, list[str]] = {name: [] for name in task.text_columns}
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = _header(reader, path, task, split)
            text_pos = [_column(header, name, path) for name in task.tsv_text_columns]
            label_pos = _column(header, task.tsv_label_column, path) if labelled else None
            index_pos = _index_position(header, task, split, path)
            for row in reader:
                if not row:  # blank line (e.g. a trailing newline)
                    continue
                line = reader.line_num
                if len(row) != len(header):
                    raise DataError(
                        f"{path}: line {line}: expected {len(header)} tab-separated fields "
                        f"({', '.join(header)}), got {len(row)}"
                    )
                idx.append(len(idx) if index_pos is None else _row_index(row[index_pos], path, line))
                for name, pos in zip(task.text_columns, text_pos):
                    texts[name].append(row[pos])
                label.append(_parse_label(row[label_pos], task, path, line) if labelled else HIDDEN_LABEL)
    except FileNotFoundError:
        raise DataError(f"{path}: GLUE {task.name} {split} file not found") from None
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not valid UTF-8 (byte {exc.start}); expected a GLUE TSV file") from None
    except csv.Error as exc:
        raise DataError(f"{path}: malformed TSV ({exc})") from None
    if not idx:
        raise DataError(f"{path}: no data rows")
    columns: dict[str, list[Any]] = {"idx": idx, **texts, "label": label}
    return datasets.Dataset.from_dict(columns, features=glue_features(task))


def glue_task_dir(glue_dir: "str | os.PathLike", task: "str | GlueTask") -> Path:
    """The folder holding ``task``'s TSVs: ``glue_dir/<GLUE folder>`` or ``glue_dir`` itself.

    Raises:
        DataError: neither ``glue_dir/<GLUE folder>`` nor ``glue_dir`` holds the task's files.
    """
    task = get_task(task)
    root = Path(glue_dir)
    if (root / task.glue_folder).is_dir():
        return root / task.glue_folder
    if any((root / name).is_file() for name in task.split_files.values()):
        return root
    example = root / task.glue_folder / next(iter(task.split_files.values()))
    if not root.is_dir():
        raise DataError(f"data.glue_dir: folder '{root}' not found; expected the GLUE root holding "
                        f"{task.glue_folder}/ (e.g. {example}), or unset data.glue_dir to use the Hub")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    import difflib

    close = difflib.get_close_matches(task.glue_folder, folders, n=1, cutoff=0.5)
    held = f"it holds {', '.join(folders[:12])}{' ...' if len(folders) > 12 else ''}" if folders else "it holds no folders"
    hint = f"; rename '{close[0]}' to '{task.glue_folder}'" if close else ""
    raise DataError(
        f"data.glue_dir: no GLUE folder '{task.glue_folder}' in {root} ({held}){hint}; expected the original "
        f"GLUE layout, e.g. {example}"
    )


# --------------------------------------------------------------------------- Hub


def load_glue_from_hub(task: "str | GlueTask", split: str):
    """Load a split from the Hub dataset ``nyu-mll/glue`` with the same columns as the TSVs.

    Class labels are mapped by their ``ClassLabel`` names, not by position.

    Raises:
        DataError: the Hub (or the cache) cannot provide it, e.g. when offline (one short
            attempt: see :func:`~bert_recipes.hub.ensure_hub_reachable`), or its label names
            are not the task's.
    """
    import datasets

    from ..hub import ensure_hub_reachable

    task = get_task(task)
    split = task.canonical_split(split)
    where = f"{task.hub_name} (config '{task.hub_config}', split '{split}')"
    ensure_hub_reachable()
    try:
        dataset = datasets.load_dataset(task.hub_name, task.hub_config, split=split)
    except Exception as exc:  # network, cache and format failures all end here
        reason = first_line(exc)[:200]
        raise DataError(
            f"data.glue_dir: not set, and {where} cannot be loaded from the Hugging Face Hub or its cache "
            f"({type(exc).__name__}: {reason}); set data.glue_dir=PATH to the GLUE TSV folders "
            f"(e.g. PATH/{task.glue_folder}/train.tsv), or go online"
        ) from None
    wanted = list(glue_features(task))
    missing = [name for name in wanted if name not in dataset.column_names]
    if missing:
        raise DataError(f"{where}: missing column '{missing[0]}'; it has: {', '.join(dataset.column_names)}")
    dataset = dataset.select_columns(wanted)
    if not task.is_regression:
        dataset = _labels_by_name(dataset, task, where)
    try:
        return dataset.cast(glue_features(task))
    except (ValueError, TypeError) as exc:
        raise DataError(f"{where}: unexpected column types ({exc})") from None


def _labels_by_name(dataset, task: GlueTask, where: str):
    """Class ids renumbered to ``task.label_names``' order by the split's ``ClassLabel`` NAMES
    (a cast alone would keep the ids, i.e. map by position); hidden labels (-1) stay -1.

    Raises:
        DataError: the split's label names are not the task's.
    """
    import datasets

    feature = dataset.features.get("label")
    if not isinstance(feature, datasets.ClassLabel):
        return dataset
    theirs = [norm_label(name) for name in feature.names]
    ours = [norm_label(name) for name in task.label_names]
    if theirs == ours:
        return dataset
    if sorted(theirs) != sorted(ours) or len(set(theirs)) != len(theirs):
        raise DataError(f"{where}: label names ({', '.join(feature.names)}) are not GLUE {task.name}'s "
                        f"({', '.join(task.label_names)}); expected the same classes, in any order")
    table = {i: ours.index(name) for i, name in enumerate(theirs)}
    dataset = dataset.cast_column("label", datasets.Value("int64"))
    return dataset.map(lambda row: {"label": table.get(row["label"], HIDDEN_LABEL)}, desc="labels by name")


def load_glue_split(task: "str | GlueTask", split: str, glue_dir: "str | os.PathLike | None" = None,
                    keep: bool = False):
    """Load one GLUE split: from ``glue_dir`` (original TSV layout) or, when it is None, the Hub.

    Args:
        task: task name or alias (``"SST-2"``, ``"sst2"``) or :class:`GlueTask`.
        split: ``train``, ``validation`` (or ``dev``), ``test``; MNLI: ``validation_matched``,
            ``validation_mismatched``, ``test_matched``, ``test_mismatched``.
        glue_dir: the GLUE root (holding ``SST-2/`` ...) or the task's own folder.
        keep: hold the result for the next identical call (a preflight check whose
            dataset the run then uses, without reading it twice).

    Returns:
        A :class:`datasets.Dataset` with ``idx``, the text columns and ``label``.

    Raises:
        UserError: unknown task or split. DataError: missing or malformed data, a train
            split whose labels are all hidden (-1).
    """
    task = get_task(task)
    split = task.canonical_split(split)
    path = None if glue_dir is None else glue_task_dir(glue_dir, task) / task.split_files[split]
    stat = path.stat() if path is not None and path.is_file() else None
    key = (task.name, split, str(path), stat and (stat.st_mtime_ns, stat.st_size))
    if key in _KEPT:  # a split the preflight loaded: used once
        return _KEPT.pop(key)
    if path is None:
        dataset, source = load_glue_from_hub(task, split), f"{task.hub_name} (config '{task.hub_config}')"
    else:
        dataset, source = read_glue_tsv(path, task, split), str(path)
    if split == "train" and not has_labels(dataset):
        raise DataError(f"{source}: every label of the {task.name} train split is hidden (-1); fine-tuning needs "
                        "labelled training data (the GLUE TSVs of data.glue_dir, or a dataset with labels)")
    if keep:
        _KEPT[key] = dataset
    return dataset


_KEPT: dict = {}  # the splits a preflight loaded (load_glue_split(keep=True)), until its run loads them


# --------------------------------------------------------------------------- features


def split_fingerprint(dataset, task: "str | GlueTask") -> dict:
    """What identifies a loaded split for a resume: ``{"examples": N, "sha256": ...}`` over its
    text columns and labels, in order (the batch plan indexes into exactly these examples),
    whatever folder or Hub cache it came from."""
    import hashlib
    import json

    columns = dataset.select_columns([*get_task(task).text_columns, "label"]).to_dict()
    digest = hashlib.sha256(json.dumps(columns, ensure_ascii=False, sort_keys=True).encode())
    return {"examples": len(dataset), "sha256": digest.hexdigest()}


def has_labels(dataset) -> bool:
    """True when every example is labelled, False when none is (``label == -1``).

    Raises:
        DataError: some examples are labelled and others hidden.
    """
    labels = dataset["label"]
    hidden = sum(1 for value in labels if value == HIDDEN_LABEL)
    if hidden and hidden != len(labels):
        raise DataError(f"{hidden} of {len(labels)} examples have hidden labels (-1); expected all or none")
    return hidden == 0


def tokenize_glue(dataset, task: "str | GlueTask", tokenizer, max_seq_length: int):
    """Featurise a GLUE split for BERT.

    Single sentences become ``[CLS] a [SEP]``, pairs ``[CLS] a [SEP] b [SEP]``, truncated to
    ``max_seq_length`` tokens (pairs with ``truncation="longest_first"``: tokens are taken
    off the longer side first). No padding: the collator pads each batch.

    Args:
        dataset: a split from :func:`load_glue_split`.
        task: its task.
        tokenizer: a BERT tokenizer (``PreTrainedTokenizerBase``).
        max_seq_length: most tokens per example, special tokens included.

    Returns:
        A dataset in the same row order with ``input_ids``, ``token_type_ids``,
        ``attention_mask`` (lists of int, length <= max_seq_length) and ``labels`` (int, or
        float for STS-B). ``labels`` is absent for an unlabelled split (test, AX).

    Raises:
        UserError: ``max_seq_length`` is not a positive integer. DataError: a text column
            is missing, or labels are partly hidden.
    """
    task = get_task(task)
    if not isinstance(max_seq_length, int) or max_seq_length < 1:
        raise UserError(f"max_seq_length must be a positive integer, got {max_seq_length!r}")
    missing = [name for name in task.text_columns if name not in dataset.column_names]
    if missing:
        raise DataError(f"GLUE {task.name} dataset has no column '{missing[0]}'; it has: {', '.join(dataset.column_names)}")
    labelled = "label" in dataset.column_names and has_labels(dataset)
    columns = task.text_columns

    def encode(batch: dict) -> dict:
        texts = [batch[name] for name in columns]
        encoded = tokenizer(
            *texts,
            truncation="longest_first" if task.is_pair else True,
            max_length=max_seq_length,
            padding=False,
            return_token_type_ids=True,
            return_attention_mask=True,
        )
        out = {key: encoded[key] for key in ("input_ids", "token_type_ids", "attention_mask")}
        if labelled:
            out["labels"] = batch["label"]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc=f"tokenize {task.name}")


# --------------------------------------------------------------------------- label mapping

__all__ = [
    "HIDDEN_LABEL",
    "glue_features",
    "glue_task_dir",
    "has_labels",
    "label_mapping",
    "load_glue_from_hub",
    "load_glue_split",
    "read_glue_tsv",
    "tokenize_glue",
]

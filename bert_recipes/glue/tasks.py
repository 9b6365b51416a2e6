"""The GLUE task registry: columns, labels, metrics, splits and files for the 9 tasks + AX.

Sources: the GLUE benchmark (Wang et al. 2019, "GLUE: A Multi-Task Benchmark and Analysis
Platform for Natural Language Understanding"), the original GLUE TSV layout written by
``download_glue_data.py``, and the Hub dataset ``nyu-mll/glue``.

Label convention
----------------
Class ids follow the Hub dataset ``nyu-mll/glue`` (so Hub and TSV data give the same ids,
and ``id2label`` of a fine-tuned checkpoint reads the same either way):

=======  =================================================  ==========================
task     ``label_names`` (id 0, 1, ...)                     label as written in TSVs
=======  =================================================  ==========================
cola     unacceptable, acceptable                           0, 1
sst2     negative, positive                                 0, 1
mrpc     not_equivalent, equivalent                         0, 1
qqp      not_duplicate, duplicate                           0, 1
stsb     (regression, one float in [0, 5])                  float ``score``
mnli     entailment, neutral, contradiction                 entailment, neutral, contradiction
qnli     entailment, not_entailment                         entailment, not_entailment
rte      entailment, not_entailment                         entailment, not_entailment
wnli     not_entailment, entailment                         0, 1
ax       entailment, neutral, contradiction (MNLI's)        (test only, no labels)
=======  =================================================  ==========================

Note MNLI's order differs from the old transformers processors (contradiction,
entailment, neutral). Labels are always converted by NAME (``tsv_labels`` -> id), never
by position, so either source gives the same ids.

Split names are the Hub's: ``train``, ``validation``, ``test`` and for MNLI
``validation_matched``, ``validation_mismatched``, ``test_matched``, ``test_mismatched``.
``dev`` is accepted for ``validation`` everywhere (``dev_matched`` etc.).

Metric keys
-----------
``accuracy``, ``f1``, ``matthews_correlation``, ``pearson``, ``spearmanr``; MNLI reports its
matched and mismatched dev accuracies under two keys, ``accuracy_m`` and ``accuracy_mm``
(the leaderboard's MNLI-m and MNLI-mm).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional

from ..errors import UserError


@dataclass(frozen=True, eq=False)
class GlueTask:
    """One GLUE task.

    Attributes:
        name: canonical lower-case name (``"sst2"``), also the Hub config of ``nyu-mll/glue``.
        glue_folder: folder in the original GLUE layout (``"SST-2"``).
        text_columns: the dataset's text columns (Hub names), one for single-sentence tasks,
            two for pair tasks.
        tsv_text_columns: the same columns as named in the GLUE TSV headers.
        tsv_label_column: the label column in the TSV header (``None`` for AX).
        label_names: class names in id order (empty for the STS-B regression).
        tsv_labels: how each class is written in the TSVs and in leaderboard files, in id
            order (``"0"``, ``"1"`` or the label name).
        metrics: metric keys :func:`bert_recipes.glue.metrics.compute_metrics` returns on
            the task's dev data (MNLI: ``accuracy_m`` and ``accuracy_mm``).
        main_metric: the key used to select checkpoints.
        split_files: split name -> TSV file name inside ``glue_folder``.
        dev_splits: labelled evaluation splits.
        test_splits: unlabelled leaderboard splits.
        leaderboard_files: test split -> file name in the submission zip.
        headerless_splits: splits whose TSV has no header row (CoLA train/dev).
        headerless_columns: column names used for those files.
        aliases: other accepted names (matched case-insensitively).
        predicted_with: for AX: the task whose model predicts it (``"mnli"``).
        split_metrics: for a task with several dev splits, the metric key of each
            (MNLI: ``validation_matched`` -> ``accuracy_m``).
        leaderboard_columns: the leaderboard's columns for the task when it has several
            (MNLI: ``MNLI-m``, ``MNLI-mm``, one per metric); default one, ``glue_folder``.
    """

    name: str
    glue_folder: str
    text_columns: tuple[str, ...]
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: Optional[str]
    label_names: tuple[str, ...]
    tsv_labels: tuple[str, ...]
    metrics: tuple[str, ...]
    main_metric: str
    split_files: dict[str, str]
    dev_splits: tuple[str, ...]
    test_splits: tuple[str, ...]
    leaderboard_files: dict[str, str]
    headerless_splits: tuple[str, ...] = ()
    headerless_columns: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    predicted_with: Optional[str] = None
    split_metrics: dict[str, str] = field(default_factory=dict)
    leaderboard_columns: tuple[str, ...] = ()
    hub_name: str = field(default="nyu-mll/glue")

    @property
    def entry_names(self) -> tuple[str, ...]:
        """Leaderboard column names: ``("CoLA",)``, ``("MNLI-m", "MNLI-mm")``."""
        return self.leaderboard_columns or (self.glue_folder,)

    @property
    def scored(self) -> bool:
        """Whether the task counts in the GLUE score (AX, a diagnostic, does not)."""
        return bool(self.dev_splits)

    @property
    def hub_config(self) -> str:
        """Config name of the task in the Hub dataset ``nyu-mll/glue``."""
        return self.name

    @property
    def is_regression(self) -> bool:
        """True for STS-B (one float output)."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Size of the classifier output: number of classes, or 1 for regression."""
        return len(self.label_names) or 1

    @property
    def is_pair(self) -> bool:
        """True when an example is a sentence pair."""
        return len(self.text_columns) == 2

    @property
    def splits(self) -> tuple[str, ...]:
        """All split names of the task."""
        return tuple(self.split_files)

    @property
    def id2label(self) -> dict[int, str]:
        """``{id: name}`` for a model config (``{0: "LABEL_0"}`` for regression)."""
        if self.is_regression:
            return {0: "LABEL_0"}
        return dict(enumerate(self.label_names))

    @property
    def label2id(self) -> dict[str, int]:
        """``{name: id}``; the inverse of :attr:`id2label`."""
        return {name: i for i, name in self.id2label.items()}

    def canonical_split(self, split: str) -> str:
        """Map ``split`` (``dev``, ``validation``, ``dev_matched``, ...) to its Hub name.

        Raises:
            UserError: the task has no such split (the message lists the valid ones).
        """
        key = split.strip().lower().replace("-", "_")
        if key.startswith("dev"):
            key = "validation" + key[len("dev"):]
        if key in self.split_files:
            return key
        raise UserError(f"GLUE task '{self.name}' has no split '{split}'; expected one of: {', '.join(self.splits)}")


_BINARY = ("0", "1")

TASKS: dict[str, GlueTask] = {}


def _register(task: GlueTask) -> None:
    TASKS[task.name] = task


_STANDARD_FILES = {"train": "train.tsv", "validation": "dev.tsv", "test": "test.tsv"}

# The tasks with one train, dev and test split (MNLI and AX are written out below): name, GLUE
# folder, text columns (Hub), text columns (TSV header), TSV label column, label names,
# TSV labels, metric keys (the first is the main metric). The leaderboard file is
# <folder>.tsv.
_STANDARD_TASKS = [
    ("cola", "CoLA", ("sentence",), ("sentence",), "label", ("unacceptable", "acceptable"), _BINARY, ("matthews_correlation",)),
    ("sst2", "SST-2", ("sentence",), ("sentence",), "label", ("negative", "positive"), _BINARY, ("accuracy",)),
    ("mrpc", "MRPC", ("sentence1", "sentence2"), ("#1 String", "#2 String"), "Quality", ("not_equivalent", "equivalent"), _BINARY, ("f1", "accuracy")),
    ("stsb", "STS-B", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "score", (), (), ("pearson", "spearmanr")),
    ("qqp", "QQP", ("question1", "question2"), ("question1", "question2"), "is_duplicate", ("not_duplicate", "duplicate"), _BINARY, ("f1", "accuracy")),
    ("qnli", "QNLI", ("question", "sentence"), ("question", "sentence"), "label", ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",)),
    ("rte", "RTE", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"), ("entailment", "not_entailment"), ("accuracy",)),
    ("wnli", "WNLI", ("sentence1", "sentence2"), ("sentence1", "sentence2"), "label", ("not_entailment", "entailment"), _BINARY, ("accuracy",)),
]
_EXTRA_FIELDS = {
    "cola": {"headerless_splits": ("train", "validation"), "headerless_columns": ("source", "label", "original_label", "sentence")},
    "sst2": {"aliases": ("sst",)},
    "stsb": {"aliases": ("sts",)},
}


def _standard(name, folder, text_columns, tsv_text_columns, label_column, label_names, tsv_labels, metrics) -> GlueTask:
    return GlueTask(
        name=name, glue_folder=folder, text_columns=text_columns, tsv_text_columns=tsv_text_columns,
        tsv_label_column=label_column, label_names=label_names, tsv_labels=tsv_labels, metrics=metrics,
        main_metric=metrics[0], split_files=dict(_STANDARD_FILES), dev_splits=("validation",), test_splits=("test",),
        leaderboard_files={"test": f"{folder}.tsv"}, **_EXTRA_FIELDS.get(name, {}),
    )


_MNLI = GlueTask(
    name="mnli", glue_folder="MNLI",
    text_columns=("premise", "hypothesis"), tsv_text_columns=("sentence1", "sentence2"),
    tsv_label_column="gold_label",
    label_names=("entailment", "neutral", "contradiction"),
    tsv_labels=("entailment", "neutral", "contradiction"),
    metrics=("accuracy_m", "accuracy_mm"), main_metric="accuracy_m",
    split_files={
        "train": "train.tsv",
        "validation_matched": "dev_matched.tsv",
        "validation_mismatched": "dev_mismatched.tsv",
        "test_matched": "test_matched.tsv",
        "test_mismatched": "test_mismatched.tsv",
    },
    dev_splits=("validation_matched", "validation_mismatched"),
    test_splits=("test_matched", "test_mismatched"),
    leaderboard_files={"test_matched": "MNLI-m.tsv", "test_mismatched": "MNLI-mm.tsv"},
    aliases=("multinli",),
    split_metrics={"validation_matched": "accuracy_m", "validation_mismatched": "accuracy_mm"},
    leaderboard_columns=("MNLI-m", "MNLI-mm"),
)
_AX = GlueTask(
    name="ax", glue_folder="diagnostic",
    text_columns=("premise", "hypothesis"), tsv_text_columns=("sentence1", "sentence2"),
    tsv_label_column=None,
    label_names=("entailment", "neutral", "contradiction"),
    tsv_labels=("entailment", "neutral", "contradiction"),
    metrics=("matthews_correlation",), main_metric="matthews_correlation",
    split_files={"test": "diagnostic.tsv"}, dev_splits=(), test_splits=("test",),
    leaderboard_files={"test": "AX.tsv"},
    aliases=("diagnostic", "glue-diagnostic"), predicted_with="mnli",
)
_BY_NAME = {task.name: task for task in (*(_standard(*row) for row in _STANDARD_TASKS), _MNLI, _AX)}
for _name in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli", "ax"):  # the leaderboard's order
    _register(_BY_NAME[_name])

# Leaderboard entries whose test set is one split of a task: name -> (task, test split).
# Keys are normalised (lower case, "-" for "_"), so "MNLI_matched" also matches.
_LEADERBOARD_ENTRIES: dict[str, tuple[str, str]] = {
    "mnli-m": ("mnli", "test_matched"),
    "mnli-mm": ("mnli", "test_mismatched"),
    "mnli-matched": ("mnli", "test_matched"),
    "mnli-mismatched": ("mnli", "test_mismatched"),
}


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _lookup_table() -> dict[str, str]:
    table = {}
    for task in TASKS.values():
        for key in (task.name, task.glue_folder, *task.aliases):
            table[_normalise(key)] = task.name
            table[_normalise(key).replace("-", "")] = task.name
    for key, (task_name, _split) in _LEADERBOARD_ENTRIES.items():
        table[key] = task_name
    return table


_LOOKUP = _lookup_table()


def get_task(name: "str | GlueTask") -> GlueTask:
    """Look a task up by name, GLUE folder name or alias, case-insensitively.

    ``"SST-2"``, ``"sst-2"``, ``"sst2"`` and ``"SST2"`` all give the SST-2 task;
    ``"MNLI-m"`` / ``"mnli_mismatched"`` give MNLI. A :class:`GlueTask` is returned as is.

    Raises:
        UserError: unknown name; the message names the closest task.
    """
    if isinstance(name, GlueTask):
        return name
    if not isinstance(name, str):
        raise UserError(f"GLUE task name must be a string, got {type(name).__name__}")
    key = _normalise(name)
    found = _LOOKUP.get(key) or _LOOKUP.get(key.replace("-", ""))
    if found:
        return TASKS[found]
    close = difflib.get_close_matches(key, list(_LOOKUP), n=1, cutoff=0.4)
    hint = f"; did you mean '{_LOOKUP[close[0]]}'?" if close else ""
    raise UserError(f"unknown GLUE task '{name}'{hint} (known: {', '.join(TASKS)})")


def predicted_by(task: GlueTask) -> list[GlueTask]:
    """The test-only tasks whose test set ``task``'s model predicts (MNLI: AX)."""
    return [other for other in TASKS.values() if other.predicted_with == task.name]


def submission_entry(task: GlueTask, split: str) -> str:
    """The submission entry name of a test split: ``sst2``, ``mnli-m``, ``mnli-mm``, ``ax``."""
    for name, (task_name, test_split) in _LEADERBOARD_ENTRIES.items():
        if (task_name, test_split) == (task.name, split):
            return name
    return task.name


def leaderboard_entry(name: str) -> tuple[GlueTask, str]:
    """Resolve a leaderboard entry name to ``(task, test split)``.

    ``"rte"`` -> (RTE, ``"test"``); ``"mnli-m"`` / ``"mnli_matched"`` -> (MNLI,
    ``"test_matched"``); ``"mnli-mm"`` -> (MNLI, ``"test_mismatched"``).

    Raises:
        UserError: unknown name, or plain ``"mnli"`` (ambiguous: it has two test sets).
    """
    key = _normalise(name) if isinstance(name, str) else name
    if isinstance(key, str) and key in _LEADERBOARD_ENTRIES:
        task_name, split = _LEADERBOARD_ENTRIES[key]
        return TASKS[task_name], split
    task = get_task(name)
    if len(task.test_splits) != 1:
        raise UserError(
            f"GLUE task '{task.name}' has {len(task.test_splits)} test sets; name them "
            "'mnli-m' (matched) and 'mnli-mm' (mismatched)"
        )
    return task, task.test_splits[0]


__all__ = ["GlueTask", "TASKS", "get_task", "leaderboard_entry", "predicted_by", "submission_entry"]

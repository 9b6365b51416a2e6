"""The fine-tuning recipe (``bert-recipes finetune`` / ``bert-recipes glue``).

Same YAML conventions as pretraining (:mod:`bert_recipes.recipe`): ``base:`` inheritance,
dotted overrides, strict keys and one-line :class:`~bert_recipes.errors.RecipeError`\\ s.
A recipe is recognised as a fine-tuning recipe by its ``task:`` key.

The ``train`` defaults are the BERT paper's fine-tuning setting (Devlin et al. 2019,
Appendix A.3: batch 32, 3 epochs, learning rate searched in {2e-5, 3e-5, 5e-5}; AdamW with
weight decay 0.01 and linear warmup over the first 10% of the steps, then linear decay).
"""

from __future__ import annotations

import difflib
from typing import ClassVar, Literal, Optional

from pydantic import Field, field_validator, model_validator

from ..errors import UserError
from ..recipe import RunConfig, Strict, TrainConfig, load_recipe
from .tasks import get_task


class FinetuneModelConfig(Strict):
    """The checkpoint to fine-tune.

    ``name_or_path`` (required): a pretraining export of this repo (``runs/tiny/final``),
    any local BERT folder, or a Hub id. A fresh classifier head is put on top of it.
    ``hidden_dropout_prob``, ``attention_probs_dropout_prob``, ``classifier_dropout``: the
    fine-tuning run's dropout; None (the default) keeps the checkpoint's (a checkpoint
    pretrained without dropout, Cramming-style, usually fine-tunes with 0.1).
    """

    name_or_path: Optional[str] = None  # required (checked by FinetuneRecipe)
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    trust_remote_code: bool = False
    hidden_dropout_prob: Optional[float] = Field(None, ge=0.0, lt=1.0)
    attention_probs_dropout_prob: Optional[float] = Field(None, ge=0.0, lt=1.0)
    classifier_dropout: Optional[float] = Field(None, ge=0.0, lt=1.0)

    def dropout_overrides(self) -> dict:
        """The dropout values the recipe sets (for ``from_pretrained``), without the ones it leaves to the checkpoint."""
        names = ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}


class FinetuneDataConfig(Strict):
    """Where the GLUE data is and how it is featurised and batched."""

    glue_dir: Optional[str] = None  # the original GLUE TSV layout; None = the Hub's nyu-mll/glue
    max_seq_length: int = Field(128, ge=8)
    pad_to_multiple_of: int = Field(8, ge=1)
    # true: each batch's examples packed into rows of max_seq_length (bert_recipes.data.packing),
    # the same examples per step as padded batches. Off by default: on SST-2, length-grouped
    # batches pad only 18% and packing saves 5% of the tokens, while the block-diagonal mask
    # computes attention over whole 128-token rows (3.5x the scores of short padded rows); padded
    # ran 1.04x packed at fp32 and 1.13-1.19x in bf16 on a CPU (benchmarks/RESULTS.md). With
    # flash-attn's variable-length kernel on a GPU attention costs each example's own length.
    # "batch" (pretraining's name for the same thing) is accepted and read as true; fine-tuning
    # has no stream packing
    packing: bool = False
    group_by_length: bool = True  # batches of similar lengths: less padding
    max_train_samples: Optional[int] = Field(None, ge=1)  # the first N training examples
    max_eval_samples: Optional[int] = Field(None, ge=1)  # the first N examples of each dev split

    @field_validator("packing", mode="before")
    @classmethod
    def _batch_means_true(cls, value):
        return True if value == "batch" else value


class FinetuneTrainConfig(TrainConfig):
    """``TrainConfig`` with the BERT paper's fine-tuning defaults.

    ``num_train_epochs`` (may be fractional) or ``max_steps`` bounds the run; ``max_steps``
    wins when both are set. Evaluation runs at the end of every epoch, every ``eval_steps``
    steps when set, and at the last step.

    ``early_stopping_patience`` (optional, in evaluations): stop once that many evaluations
    in a row have not beaten the best dev main metric; the best model stays in
    ``output_dir/best``. Set ``eval_steps`` too to evaluate more often than once per epoch.

    ``keep_final_checkpoint: false``: once the run has finished and written ``results.json``,
    delete its ``checkpoints/`` (weights, optimizer state, RNGs: 3x the export's size; a sweep
    keeps one per cell and seed). Its ``best/`` export and results stay, and a resume reuses
    them; only extending it with more steps is then impossible. A stopped or crashed run
    keeps its checkpoints either way.
    """

    num_train_epochs: Optional[float] = Field(3.0, gt=0)
    per_device_train_batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(2e-5, gt=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    weight_decay: float = Field(0.01, ge=0.0)
    early_stopping_patience: Optional[int] = Field(None, ge=1)  # evaluations without improvement; None: off
    keep_final_checkpoint: bool = True  # false: a finished run deletes checkpoints/ (best/ and results stay)


GRID_KEYS = tuple(name for name in FinetuneTrainConfig.model_fields)


class SweepConfig(Strict):
    """How ``bert-recipes glue`` chooses each task's configuration (:mod:`.grid`).

    ``grid``: ``{train key: [values]}``; the cells are the product of the lists, each run
    once per seed of ``seeds``. Empty: one cell, the recipe's own ``train``. A per-task file
    may set its own lists (they replace the shared ones key by key).
    ``protocol``: ``select`` picks per task the cell with the best dev main metric averaged
    over seeds; ``fixed`` runs one configuration for every task with no selection on dev
    (a grid of one cell at most, the same ``train`` for every task), as Cramming compares
    pretraining runs.
    ``wnli``: ``include`` (train it and average it), ``exclude`` (leave it out of the run
    and the score) or ``majority`` (no training: predict the training set's majority class,
    the BERT paper's choice). Read from the base recipe only, like ``protocol``.
    """

    grid: dict[str, list] = {}
    protocol: Literal["select", "fixed"] = "select"
    wnli: Literal["include", "exclude", "majority"] = "include"

    @field_validator("grid")
    @classmethod
    def _train_keys(cls, value: dict[str, list]) -> dict[str, list]:
        for key, values in value.items():
            if key not in GRID_KEYS:
                close = difflib.get_close_matches(key, GRID_KEYS, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"one of {', '.join(GRID_KEYS)}"
                raise ValueError(f"sweep.grid: '{key}' is not a train key ({hint})")
            if not isinstance(values, list) or not values:
                raise ValueError(f"sweep.grid.{key}: expected a non-empty list of values, got {values!r}")
            if len(set(map(repr, values))) != len(values):
                raise ValueError(f"sweep.grid.{key}: values must be distinct, got {values}")
        return value

    def cells(self, train: "FinetuneTrainConfig") -> list[dict]:
        """The grid's cells as ``{train key: value}`` in order (the last key varies fastest);
        ``[{}]`` for an empty grid. Each cell is validated on top of ``train`` and its
        values normalised (YAML's ``5e-5`` string becomes the float ``5e-05``).

        Raises:
            ValueError: a value the train section refuses (e.g. a negative learning rate).
        """
        import itertools

        keys = list(self.grid)
        cells = []
        for values in itertools.product(*(self.grid[k] for k in keys)):
            checked = FinetuneTrainConfig.model_validate({**train.model_dump(), **dict(zip(keys, values))})
            cells.append({key: getattr(checked, key) for key in keys})  # YAML's "5e-5" -> 5e-05
        return cells


def _trained_task(value: Optional[str], untrained: str) -> Optional[str]:
    """The canonical name of a GLUE task that has training data (None stays None).

    Raises:
        ValueError: an unknown task, or one without training data (``untrained`` says why;
            ``{}`` is replaced by the task that predicts it).
    """
    if value is None:
        return None
    try:
        task = get_task(value)
    except UserError as exc:
        raise ValueError(str(exc)) from None
    if not task.dev_splits:
        raise ValueError(f"'{task.name}': " + untrained.format(task.predicted_with))
    return task.name


class FinetuneRecipe(RunConfig):
    """A GLUE fine-tuning recipe: one task, one checkpoint, one or several seeds."""

    task: Optional[str] = None  # required: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli
    output_dir: str = "runs/glue"
    model: FinetuneModelConfig = FinetuneModelConfig()
    tokenizer_name_or_path: Optional[str] = None  # default: the checkpoint's tokenizer
    data: FinetuneDataConfig = FinetuneDataConfig()
    train: FinetuneTrainConfig = FinetuneTrainConfig()
    seeds: list[int] = []  # empty: one run with `seed`; else one sub-run per seed (output_dir/seed-<s>)
    predict_test: bool = False  # predict the unlabelled test split(s) with the best model
    init_from_task: Optional[str] = None  # bert-recipes glue: start from that task's chosen encoder (head dropped)
    sweep: SweepConfig = SweepConfig()  # bert-recipes glue: grid, protocol, WNLI (see SweepConfig)

    kind: ClassVar[str] = "fine-tuning"  # a class attribute, not a key: what overwrite=true may replace

    def tokenizer_source(self) -> tuple[str, str]:
        """``(key, name_or_path)`` of the tokenizer: ``tokenizer_name_or_path``, else the checkpoint's."""
        if self.tokenizer_name_or_path:
            return "tokenizer_name_or_path", self.tokenizer_name_or_path
        return "model.name_or_path", self.model.name_or_path

    def reads(self) -> dict[str, str]:
        """The folders or Hub ids this run loads, by recipe key (never deleted by overwrite)."""
        return {key: value for key, value in (("model.name_or_path", self.model.name_or_path),
                                              ("tokenizer_name_or_path", self.tokenizer_name_or_path)) if value}

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: Optional[str]) -> Optional[str]:
        return _trained_task(value, "it has no training data; it is predicted with the {} model")

    @field_validator("init_from_task")
    @classmethod
    def _known_source(cls, value: Optional[str]) -> Optional[str]:
        return _trained_task(value, "it is not trained, it has no encoder to start from")

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds must be distinct, got {value}")
        if any(not 0 <= seed < 2**32 for seed in value):
            raise ValueError(f"seeds must be between 0 and 2**32 - 1, got {value}")
        return value

    @model_validator(mode="after")
    def _complete(self) -> "FinetuneRecipe":
        if self.task is None:
            raise ValueError("task is required: one of cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
        if not self.model.name_or_path:
            raise ValueError(
                "model.name_or_path is required: a pretraining export (e.g. runs/tiny/final), "
                "a local BERT folder or a Hub id"
            )
        if self.train.max_steps is None and self.train.num_train_epochs is None:
            raise ValueError("train.num_train_epochs or train.max_steps must bound the run")
        if self.init_from_task == self.task:
            raise ValueError(f"init_from_task: '{self.task}' cannot start from itself")
        try:
            self.sweep.cells(self.train)
        except ValueError as exc:
            first = exc.errors()[0] if hasattr(exc, "errors") else None
            detail = f"{'.'.join(map(str, first['loc']))}: {first['msg']}" if first else str(exc)
            raise ValueError(f"sweep.grid gives a bad train value ({detail})") from None
        return self


def load_finetune_recipe(path, overrides: list[str] | None = None) -> FinetuneRecipe:
    """Load, merge, override and validate a fine-tuning recipe (one-line RecipeError)."""
    return load_recipe(path, overrides, schema=FinetuneRecipe)


__all__ = ["FinetuneDataConfig", "FinetuneModelConfig", "FinetuneRecipe", "FinetuneTrainConfig", "SweepConfig",
           "load_finetune_recipe"]

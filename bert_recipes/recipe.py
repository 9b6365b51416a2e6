"""YAML recipe -> typed, validated recipe.

A recipe is a YAML mapping. It may name a ``base:`` recipe file (a path relative to the
recipe) whose keys it overrides (deep merge, recursively). On the command line, dotted
overrides ``train.max_steps=20`` or ``data.train_files=[a.txt,b.txt]`` are applied last; the
value is parsed as YAML.

Validation is strict: an unknown key is an error naming the closest valid key, a wrong type
names the key and the expected type, and impossible combinations (``max_predictions_per_seq``
larger than the sequence, ``hidden_size`` not divisible by ``num_attention_heads``) are
refused before any work starts. Every error is a one-line :class:`RecipeError`.

YAML is read with a ``yaml.SafeLoader`` with YAML 1.2 booleans (``no``/``on`` stay strings,
:class:`~bert_recipes.recipe_files.RecipeLoader`). An error caused by a command-line
override names that override instead of the file.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import RecipeError
from .recipe_files import (apply_overrides, dump_recipe, error_key, expand_files, format_error, load_raw,
                           override_for, save_recipe)

PRECISIONS = ("auto", "no", "bf16", "fp16")


def _is_number(annotation) -> bool:
    """``int``, ``float`` or either of them ``| None``."""
    import typing

    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)] or [annotation]
    return all(arg in (int, float) for arg in args)


class Strict(BaseModel):
    """A recipe section: unknown keys are errors; a number key refuses ``true`` / ``false``
    (pydantic would read them as 1 / 0: ``model.hidden_dropout_prob=false`` was 0.0) and
    infinities and nan (``train.learning_rate=.inf`` trained to NaN weights);
    immutable once validated (derived values live in
    :class:`bert_recipes.training.plan.Resolved`, never in the recipe)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value, info):
        if isinstance(value, bool) and _is_number(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"expected a number (got {str(value).lower()})")
        return value


def _as_list(value: Any) -> Any:
    if isinstance(value, str):
        return [value]
    return value


# --------------------------------------------------------------------------- sections


class BertArchitecture(Strict):
    """BertConfig fields, in BertConfig's order; ``vocab_size`` comes from the tokenizer."""

    hidden_size: int = Field(768, gt=0)
    num_hidden_layers: int = Field(12, gt=0)
    num_attention_heads: int = Field(12, gt=0)
    intermediate_size: int = Field(3072, gt=0)
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)
    attention_probs_dropout_prob: float = Field(0.1, ge=0.0, lt=1.0)
    max_position_embeddings: int = Field(512, gt=0)
    type_vocab_size: int = Field(2, gt=0)
    initializer_range: float = Field(0.02, gt=0.0)
    layer_norm_eps: float = Field(1e-12, gt=0.0)

    @model_validator(mode="after")
    def _heads_divide_hidden(self) -> "BertArchitecture":
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.config.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.config.num_attention_heads ({self.num_attention_heads})"
            )
        return self


class ModelConfig(Strict):
    """Which BERT to train.

    ``name_or_path`` starts from a checkpoint (a local folder or a Hub id); otherwise the
    model is initialised from ``config``.
    """

    name_or_path: Optional[str] = None
    config: BertArchitecture = BertArchitecture()
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    sparse_mlm_head: bool = True
    trust_remote_code: bool = False


class TokenizerConfig(Strict):
    """Which tokenizer to use, or how to train one.

    ``name_or_path`` loads an existing BERT tokenizer (local folder or Hub id). When it is
    empty and ``model.name_or_path`` is set, the checkpoint's tokenizer is used. Otherwise
    a WordPiece vocabulary is trained on ``train_files`` (default: ``data.train_files``).
    """

    name_or_path: Optional[str] = None
    vocab_size: int = Field(30522, gt=10)
    min_frequency: int = Field(2, ge=1)
    lowercase: bool = True
    train_files: Optional[list[str]] = None

    _list = field_validator("train_files", mode="before")(_as_list)


class DataConfig(Strict):
    """Pretraining data: where the text is and how instances are built.

    The instance and masking parameters follow create_pretraining_data.py of
    google-research/bert.
    """

    train_files: list[str] = []
    eval_files: list[str] = []
    dataset_name: Optional[str] = None
    dataset_config_name: Optional[str] = None
    dataset_split: str = "train"
    eval_dataset_split: Optional[str] = None
    text_column: str = "text"
    document_split: Literal["auto", "file", "blank_line", "record"] = "auto"
    document_start_regex: Optional[str] = None
    sentence_split: Literal["punkt", "line"] = "punkt"
    corpus_access: Literal["auto", "index", "stream"] = "auto"
    index_cache_dir: Optional[str] = None
    preprocessing_num_workers: Optional[int] = Field(None, ge=1)
    interleave_documents: int = Field(16, ge=1)
    max_seq_length: int = Field(128, ge=8)
    short_seq_prob: float = Field(0.1, ge=0.0, le=1.0)
    short_seq_scope: Literal["document", "instance"] = "document"
    masked_lm_prob: float = Field(0.15, gt=0.0, lt=1.0)
    max_predictions_per_seq: int = Field(20, ge=1)
    whole_word_mask: bool = False
    random_next_prob: float = Field(0.5, ge=0.0, le=1.0)
    random_next_buffer_size: int = Field(1000, ge=1)
    shuffle_buffer_size: int = Field(1000, ge=0)
    pad_to_multiple_of: int = Field(8, ge=1)
    # "batch" (default): each batch's instances packed into rows of max_seq_length, the same
    # instances per step as unpacked (1.15x tiny, 1.46x BERT-base seq 128: benchmarks/RESULTS.md);
    # false: one instance per row, padded to the batch's longest; true: rows packed by the
    # stream, a batch counts rows (see bert_recipes/data/packing.py)
    packing: Literal[False, True, "batch"] = "batch"
    packing_window: int = Field(256, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)
    max_eval_samples: Optional[int] = Field(1000, ge=1)

    _lists = field_validator("train_files", "eval_files", mode="before")(_as_list)

    @model_validator(mode="after")
    def _predictions_fit(self) -> "DataConfig":
        # [CLS] A [SEP] B [SEP]: at most max_seq_length - 3 maskable tokens.
        if self.max_predictions_per_seq > self.max_seq_length - 3:
            raise ValueError(
                f"data.max_predictions_per_seq ({self.max_predictions_per_seq}) must be at most "
                f"data.max_seq_length - 3 ({self.max_seq_length - 3})"
            )
        return self


class TrainConfig(Strict):
    """Optimisation and bookkeeping; names follow transformers' TrainingArguments."""

    max_steps: Optional[int] = Field(None, ge=1)
    num_train_epochs: Optional[float] = Field(None, gt=0)
    per_device_train_batch_size: int = Field(32, ge=1)
    per_device_eval_batch_size: int = Field(64, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    global_batch_size: Optional[int] = Field(None, ge=1)
    learning_rate: float = Field(1e-4, gt=0.0)
    weight_decay: float = Field(0.01, ge=0.0)
    adam_beta1: float = Field(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = Field(0.999, ge=0.0, lt=1.0)
    adam_epsilon: float = Field(1e-6, gt=0.0)
    optimizer: Literal["adamw", "lamb"] = "adamw"
    lr_scheduler_type: Literal["linear", "cosine", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, le=1.0)
    warmup_steps: Optional[int] = Field(None, ge=0)
    max_grad_norm: float = Field(1.0, ge=0.0)
    logging_steps: int = Field(10, ge=1)
    save_steps: int = Field(0, ge=0)
    eval_steps: int = Field(0, ge=0)
    save_total_limit: int = Field(2, ge=1)
    max_consecutive_nonfinite_steps: int = Field(10, ge=1)
    torch_compile: bool = False
    peak_flops: Optional[float] = Field(None, gt=0)
    reschedule_on_resume: bool = False  # resume with changed schedule keys (see training/resume.py)

    def warmup_for(self, total_steps: int) -> int:
        """Warmup steps: ``warmup_steps`` when set, else ``ceil(warmup_ratio * total)``."""
        if self.warmup_steps is not None:
            return self.warmup_steps
        import math

        return math.ceil(self.warmup_ratio * total_steps)

    def accumulation_for(self, world_size: int) -> int:
        """Micro-batches per optimizer step on ``world_size`` processes.

        ``gradient_accumulation_steps`` unless ``global_batch_size`` is set, in which case
        ``global_batch_size / (per_device_train_batch_size * world_size)``, so one recipe
        keeps the same optimizer batch (and learning rate) on 1 or 64 devices.

        Raises:
            RecipeError: ``global_batch_size`` is not a multiple of the per-step batch.
        """
        if self.global_batch_size is None:
            return self.gradient_accumulation_steps
        per_step = self.per_device_train_batch_size * world_size
        if self.global_batch_size % per_step:
            raise RecipeError(
                f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                f"train.per_device_train_batch_size x processes ({self.per_device_train_batch_size} x {world_size} = {per_step})"
            )
        return self.global_batch_size // per_step


class RunConfig(Strict):
    """Keys shared by pretraining and fine-tuning recipes."""

    output_dir: str = "runs/run"
    overwrite: bool = False
    seed: int = Field(42, ge=0, lt=2**32)  # what the RNGs take (accelerate's set_seed)
    precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    keep_host_memory: bool = True  # on a CPU device, glibc keeps freed memory for the next step (training/host_memory.py)
    resume_from: Optional[str] = None
    report_to: list[Literal["jsonl", "tensorboard", "trackio", "wandb"]] = ["jsonl"]
    train: TrainConfig = TrainConfig()

    _report = field_validator("report_to", mode="before")(_as_list)


class PretrainRecipe(RunConfig):
    """A pretraining recipe (``bert-recipes pretrain``)."""

    output_dir: str = "runs/pretrain"
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()

    kind: ClassVar[str] = "pretraining"  # a class attribute, not a key: what overwrite=true may replace

    def tokenizer_source(self) -> tuple[str, str] | None:
        """``(key, name_or_path)`` of the tokenizer to load; None: train a WordPiece one."""
        if self.tokenizer.name_or_path:
            return "tokenizer.name_or_path", self.tokenizer.name_or_path
        if self.model.name_or_path:
            return "model.name_or_path", self.model.name_or_path
        return None

    def reads(self) -> dict[str, str]:
        """The folders or Hub ids this run loads, by recipe key (never deleted by overwrite)."""
        return {key: value for key, value in (("model.name_or_path", self.model.name_or_path),
                                              ("tokenizer.name_or_path", self.tokenizer.name_or_path)) if value}

    @model_validator(mode="after")
    def _complete(self) -> "PretrainRecipe":
        if not self.data.train_files and not self.data.dataset_name:
            raise ValueError("data.train_files is empty: expected a list of text files or globs (or data.dataset_name)")
        if self.train.max_steps is None:
            raise ValueError("train.max_steps is required for pretraining (a positive integer)")
        if self.model.name_or_path is None and self.data.max_seq_length > self.model.config.max_position_embeddings:
            raise ValueError(
                f"data.max_seq_length ({self.data.max_seq_length}) exceeds "
                f"model.config.max_position_embeddings ({self.model.config.max_position_embeddings})"
            )
        return self


# --------------------------------------------------------------------------- validation


def validate(schema: type[BaseModel], raw: dict, source: str, overrides: list[str] = (), file_raw: dict | None = None):
    """Validate ``raw`` against ``schema``; raise a one-line :class:`RecipeError`.

    The message starts with ``source`` (the recipe file), or with ``override 'key=value'``
    when the offending key was set by one of ``overrides``; or it says the file is another
    kind of recipe than the command takes (judged on ``file_raw``, the file before the
    overrides, when given: ``data.glue_dir=...`` on the command line does not make a
    pretraining recipe a fine-tuning one).

    Raises:
        RecipeError: the recipe is invalid.
    """
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        item = override_for(error_key(err), list(overrides))
        where = f"override '{item}'" if item else source
        kind = _wrong_kind(schema, raw if file_raw is None else file_raw, source)
        raise RecipeError(kind or format_error(schema, where, err)) from None


def is_finetuning_recipe(raw: dict) -> bool:
    """Whether a raw (or dumped) recipe is a GLUE fine-tuning one: it has ``task``,
    ``predict_test`` or ``data.glue_dir``, keys no pretraining recipe has."""
    data = raw.get("data")
    return "task" in raw or "predict_test" in raw or (isinstance(data, dict) and "glue_dir" in data)


def _wrong_kind(schema: type[BaseModel], raw: dict, source: str) -> str | None:
    """Say so when the file is another kind of file than the command takes."""
    if "compute_environment" in raw or "distributed_type" in raw:
        return (f"{source}: an Accelerate launch config, not a recipe; use it as `accelerate launch --config_file "
                f"{source} -m bert_recipes pretrain RECIPE.yaml`")
    data, model = raw.get("data") or {}, raw.get("model") or {}
    finetuning = is_finetuning_recipe(raw)
    pretraining = (isinstance(data, dict) and "train_files" in data) or (isinstance(model, dict) and "config" in model)
    if schema is PretrainRecipe and finetuning and not pretraining:
        return f"{source}: a GLUE fine-tuning recipe (it has task/data.glue_dir); run it with `bert-recipes finetune {source}`"
    if schema is not PretrainRecipe and pretraining and not finetuning:
        return f"{source}: a pretraining recipe (it has data.train_files/model.config); run it with `bert-recipes pretrain {source}`"
    return None


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None, schema: type[BaseModel] = PretrainRecipe):
    """Load, merge, override and validate a recipe.

    Args:
        path: the recipe YAML file.
        overrides: ``key.path=value`` strings applied after ``base:`` inheritance.
        schema: :class:`PretrainRecipe` or a fine-tuning schema.

    Returns:
        The validated recipe object.

    Raises:
        RecipeError: one line naming the file/key and what was expected.
    """
    file_raw = load_raw(path)
    raw = apply_overrides(file_raw, list(overrides or []))
    return validate(schema, raw, str(path), list(overrides or []), file_raw)


__all__ = [
    "BertArchitecture",
    "DataConfig",
    "ModelConfig",
    "PretrainRecipe",
    "TokenizerConfig",
    "TrainConfig",
    "RunConfig",
    "Strict",
    "apply_overrides",
    "is_finetuning_recipe",
    "dump_recipe",
    "expand_files",
    "load_raw",
    "load_recipe",
    "save_recipe",
    "validate",
]

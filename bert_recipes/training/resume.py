"""What a resume continues: the checkpoint's step, and whether the schedule may change.

The learning-rate schedule is a function of the ``train`` keys in :data:`SCHEDULE_KEYS`. A
resumed run compares them with the checkpoint's own ``recipe.yaml``:

- all equal: the schedule continues exactly (the usual resume after a crash);
- only ``train.max_steps`` raised (extending a finished or stopped run): allowed; the
  schedule is recomputed for the new length from the checkpoint's step, and one line says
  so with the learning rate before and after;
- anything else (a new ``learning_rate``, warmup, scheduler type, epochs, or a smaller
  ``max_steps``): refused with one line naming the key, unless
  ``train.reschedule_on_resume: true``, which recomputes the schedule with the new values
  from the checkpoint's step (and says so in one line).

Keys that say what the checkpoint is (its model, tokenizer, data stream, batch plan:
:data:`IDENTITY_PREFIXES`, :data:`IDENTITY_KEYS`) cannot change on resume: refused in one line.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from .checkpoint import TRAINER_STATE

logger = logging.getLogger("bert_recipes")

SCHEDULE_KEYS = ("max_steps", "num_train_epochs", "learning_rate", "lr_scheduler_type", "warmup_ratio", "warmup_steps")

#: Keys that say what a checkpoint IS (its model, tokenizer, data stream or batch plan): a
#: resume cannot change them (the weights would not load, the saved tokenizer would be
#: reused silently, or the saved data position would point into another stream). Any key
#: under these prefixes, and these keys.
IDENTITY_PREFIXES = ("model.config.", "tokenizer.")
IDENTITY_KEYS = frozenset({
    "seed", "task", "model.name_or_path", "tokenizer_name_or_path",
    "model.hidden_dropout_prob", "model.attention_probs_dropout_prob", "model.classifier_dropout",
    "train.per_device_train_batch_size", "train.gradient_accumulation_steps", "train.global_batch_size",
    "data.max_seq_length", "data.masked_lm_prob", "data.max_predictions_per_seq", "data.short_seq_prob",
    "data.short_seq_scope", "data.whole_word_mask", "data.random_next_prob", "data.sentence_split",
    "data.document_split", "data.document_start_regex", "data.text_column", "data.max_train_samples",
    "data.group_by_length", "data.interleave_documents", "data.shuffle_buffer_size", "data.random_next_buffer_size",
    "data.packing_window", "data.dataset_name", "data.dataset_config_name", "data.dataset_split",
})
#: Fine-tuning only: the dev examples the best model so far was chosen on (pretraining picks no best).
FINETUNE_IDENTITY_KEYS = frozenset({"data.max_eval_samples"})


@dataclass(frozen=True)
class ResumePoint:
    """A verified checkpoint to resume from: its path, step and the schedule keys that changed
    (``{key: (checkpoint's value, recipe's value)}``; empty: the same schedule)."""

    path: Path
    step: int
    changed: dict

    def note(self) -> str | None:
        """The one line a rescheduled resume prints (None when the schedule is unchanged)."""
        if not self.changed:
            return None
        what = ", ".join(f"train.{key} {old} -> {new}" for key, (old, new) in self.changed.items())
        return f"resume from step {self.step}: {what}: the learning-rate schedule is recomputed with the new values"


def _checkpoint_recipe(path: Path) -> dict:
    from ..recipe_files import parse_yaml

    try:
        saved = parse_yaml((path / "recipe.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, ValueError):
        return {}
    return saved if isinstance(saved, dict) else {}


def _checkpoint_train(path: Path) -> dict:
    train = _checkpoint_recipe(path).get("train")
    return train if isinstance(train, dict) else {}


def same_value(key: str, saved, now, where: Path) -> bool:
    """Whether a recipe key's value in a saved run (``saved``) and now (``now``) are the same
    for the run in folder ``where``: equal, or, for ``model.name_or_path``, the encoder a GLUE
    sweep exported for ``init_from_task`` (``<sweep>/encoders/<task>``, ``where`` inside that
    sweep) in a sweep that has moved or whose folder is given another way (relative,
    absolute). Another model that merely ends in ``encoders/<task>`` is not the same."""
    if saved == now:
        return True
    if key != "model.name_or_path" or not (isinstance(saved, str) and isinstance(now, str)):
        return False
    tail, here = Path(saved).parts[-2:], Path(now)
    return (len(tail) == 2 and tail[0] == "encoders" and tail == here.parts[-2:]
            and here.resolve().parent.parent in Path(where).resolve().parents)


def check_identity(recipe, path: Path) -> None:
    """Refuse a resume whose recipe changes what the checkpoint at ``path`` is
    (:data:`IDENTITY_PREFIXES`, :data:`IDENTITY_KEYS`; fine-tuning: :data:`FINETUNE_IDENTITY_KEYS`,
    the best model so far was chosen on those dev examples), compared with its ``recipe.yaml``.

    Raises:
        UserError: one line naming the first such key, its value in the checkpoint and how to go on.
    """
    from ..recipe_files import as_override, flatten

    saved, now = flatten(_checkpoint_recipe(path)), flatten(recipe.model_dump(mode="json"))
    keys = IDENTITY_KEYS | (FINETUNE_IDENTITY_KEYS if "task" in now else frozenset())
    from_checkpoint = bool(recipe.model.name_or_path)
    for key in saved:
        if from_checkpoint and key.startswith("model.config.") and not key.endswith("dropout_prob"):
            continue  # the checkpoint's architecture (model.name_or_path is compared); older runs recorded the recipe's
        if (key in keys or key.startswith(IDENTITY_PREFIXES)) and key in now \
                and not same_value(key, saved[key], now[key], path):
            raise UserError(f"{key}: {now[key]} differs from the value {saved[key]} of checkpoint {path}; a resume "
                            f"continues that run's model, tokenizer and data: set {key}={as_override(saved[key])} to "
                            "resume it, or output_dir=DIR for a new run (model.name_or_path=<its export> starts from "
                            "its weights)")


def check_resume(recipe, path: Path) -> ResumePoint:
    """Compare ``recipe`` with the checkpoint at ``path`` (see the module doc, and
    :func:`check_identity`).

    Raises:
        UserError: ``train.max_steps`` below the checkpoint's step, a schedule key changed
            without ``train.reschedule_on_resume: true``, or a key of the checkpoint's
            identity changed.
    """
    from ..recipe_files import as_override

    check_identity(recipe, path)
    step = int(json.loads((path / TRAINER_STATE).read_text())["step"])
    train, saved = recipe.train, _checkpoint_train(path)
    if train.max_steps is not None and train.max_steps < step:
        raise UserError(f"train.max_steps: {train.max_steps} is below the step of checkpoint {path} ({step}); "
                        f"set train.max_steps={step} or more to continue that run")
    changed = {key: (saved[key], getattr(train, key)) for key in SCHEDULE_KEYS
               if key in saved and saved[key] != getattr(train, key)}
    longer = "max_steps" in changed and (changed["max_steps"][0] or 0) < (train.max_steps or 0)
    refused = [key for key in changed if not (key == "max_steps" and longer)]
    if refused and not getattr(train, "reschedule_on_resume", False):
        key = refused[0]
        old, new = changed[key]
        raise UserError(f"train.{key}: {new} differs from the value {old} of checkpoint {path}; resuming with another "
                        f"schedule is refused: set train.{key}={as_override(old)} to continue the same schedule, or "
                        "train.reschedule_on_resume=true to recompute it with the new values from the checkpoint's step")
    return ResumePoint(path, step, changed)


def refuse_retraining_export(export: Path, overwrite: bool = False) -> None:
    """``resume_from`` found no checkpoint: a fresh start (logged), unless that would retrain
    over an export without ``overwrite``.

    Raises:
        UserError: ``export`` exists and ``overwrite`` is false (only ``overwrite=true``
            replaces it); for a finished GLUE run that kept no checkpoint
            (``train.keep_final_checkpoint: false``), saying so.
    """
    checkpoints = export.parent / "checkpoints"
    if export.exists() and not overwrite:
        kept = _checkpoint_train(export.parent).get("keep_final_checkpoint", True)  # the run's own recipe.yaml
        why = (" (a finished run with train.keep_final_checkpoint: false keeps none, so it cannot be extended)"
               if kept is False and (export.parent / "results.json").is_file() else "")
        raise UserError(f"resume_from: no complete checkpoint in {checkpoints} to continue{why}, and {export} holds "
                        "an export: set overwrite=true to retrain from step 0 and replace it")
    from .accelerator import launch_state

    if not launch_state().is_main_process:  # said once, not per rank
        return
    if export.exists():  # overwrite may come from the recipe file (tiny.yaml): say it loudly
        logger.warning("resume_from=latest: no complete checkpoint in %s to continue, and overwrite=true: retraining "
                       "from step 0, replacing %s", checkpoints, export)
    else:
        logger.info("resume_from=latest: no complete checkpoint in %s yet; starting from step 0", checkpoints)


def nothing_to_resume(recipe, export: Path, doomed: list[str], artefacts: tuple[str, ...] = ()) -> list[str]:
    """``resume_from`` found no checkpoint: a fresh start, refused over an export without
    ``overwrite`` (:func:`refuse_retraining_export`); with ``overwrite`` the fresh start
    replaces the earlier run's files. Returns what to delete (``doomed`` otherwise)."""
    from .outdir import check_output_dir

    refuse_retraining_export(export, recipe.overwrite)
    return check_output_dir(recipe.model_copy(update={"resume_from": None}), artefacts) if recipe.overwrite else doomed


def resumed(accelerator, point: ResumePoint, scheduler, learning_rate: float) -> None:
    """After the checkpoint at ``point`` loaded: the new schedule from its step when
    ``point.changed`` (:func:`reschedule`), and one log line each (main process only, not once
    per rank)."""
    before = scheduler.get_last_lr()[0]
    if point.changed:
        reschedule(scheduler, learning_rate)
    if accelerator.is_main_process:
        logger.info("resumed from %s at step %d", point.path, point.step)
        if point.changed:
            logger.warning("%s; lr %.3g -> %.3g", point.note(), before, scheduler.get_last_lr()[0])


def reschedule(scheduler, learning_rate: float) -> None:
    """After loading a checkpoint into ``scheduler`` (a ``LambdaLR`` built for the new recipe):
    base learning rate ``learning_rate`` and the current rate from the new schedule."""
    scheduler.base_lrs = [learning_rate for _ in scheduler.base_lrs]
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in groups]


__all__ = ["SCHEDULE_KEYS", "ResumePoint", "check_resume", "nothing_to_resume", "refuse_retraining_export", "reschedule",
           "resumed"]

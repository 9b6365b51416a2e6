"""``bert-recipes pretrain``: BERT pretraining (masked LM + next-sentence prediction).

``pretrain(recipe)`` reads as preflight -> build -> train -> export:

- :func:`preflight` runs every cheap check (files, model config, sequence length vs
  positions, DeepSpeed + accumulation, trackers, output_dir) before anything is written;
- :func:`build` creates the accelerator, the run directory, the tokenizer, the model,
  optimizer, schedule and data stream, and restores a checkpoint when resuming;
- :func:`~bert_recipes.training.loop.train` runs the loop over a
  :class:`~bert_recipes.pretrain_job.PretrainJob`;
- :func:`export` writes the ``save_pretrained`` folder ``output_dir/final``.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .data.checks import check_corpus
from .data.loader import build_pretraining_dataloader, check_saved_data, check_saved_workers, stop_workers
from .errors import UserError
from .export import export_pretrained
from .hub import check_local_folder, ensure_hub_reachable, local_or_hub
from .modeling import BertPreTrainingObjective, build_pretraining_model, load_config
from .pretrain_job import PretrainJob, eval_batches, evaluate
from .recipe import PretrainRecipe, expand_files, save_recipe
from .tokenizer import load_tokenizer, recipe_tokenizer, save_tokenizer
from .training.accelerator import check_launch, finish_trackers, launch_state, start_run
from .training.checkpoint import TrainerState, check_data_layout, find_resume_checkpoint, load_checkpoint
from .training.loop import Run, train
from .training.optim import build_optimizer, build_scheduler
from .training.outdir import check_output_dir, release_output_dir
from .training.plan import Resolved, resolve
from .training.precision import precision_by_step
from .training.resume import ResumePoint, check_resume, nothing_to_resume, resumed
from .training.reporting import Reporter, interactive
from .training.throughput import peak_flops_per_second

logger = logging.getLogger("bert_recipes")


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` found: the resolved recipe, the files, what to resume or delete."""

    plan: Resolved
    train_files: list[str]
    eval_files: list[str]
    resume: Path | None
    doomed: list[str]
    point: ResumePoint | None = None
    complete: bool = False


def pretrain(recipe: PretrainRecipe) -> Path:
    """Run a pretraining recipe; return the export folder ``output_dir/final``.

    With ``resume_from`` on a run that is complete (its last checkpoint is at
    ``train.max_steps`` and ``final/`` exists) nothing is touched: it logs so and returns
    ``final/``.

    Raises:
        UserError: bad files, an occupied output_dir, an unloadable checkpoint, a changed
            schedule on resume, ...
        RunStopped: stopped by SIGTERM/SIGINT after saving a checkpoint.
    """
    checked = preflight(recipe)
    if checked.complete:
        final = Path(recipe.output_dir) / "final"
        logger.info("%s: the run is complete (step %d = train.max_steps); nothing to do: raise train.max_steps "
                    "to continue it", recipe.output_dir, checked.point.step)
        return final
    try:
        run, job = build(checked)
        try:
            train(job, run)
        finally:  # stopped, failed or done: the DataLoader workers go now, not at interpreter exit
            stop_workers(job.batches)
        return export(run, job)
    finally:
        release_output_dir(recipe.output_dir)


def preflight(recipe: PretrainRecipe) -> Checked:
    """Every cheap check, before anything is written, deleted or trained.

    Raises:
        UserError: a missing or damaged model/tokenizer folder (weight files' headers, a
            tokenizer without a vocabulary), a missing or binary data file, ``data.max_seq_length``
            beyond the checkpoint's positions, DeepSpeed with accumulation, an indivisible
            ``global_batch_size``, an occupied ``output_dir``, an incomplete ``resume_from``,
            ``resume_from`` on an export without a checkpoint, a changed schedule on resume.
    """
    for key, source in recipe.reads().items():
        path, local = local_or_hub(source, key)
        if local:
            check_local_folder(path, key, "tokenizer" if key.startswith("tokenizer") else "model")
    if recipe.tokenizer_source() is not None:
        recipe_tokenizer(recipe)  # loads: a folder without a vocabulary fails here, not after overwrite deleted
    if recipe.data.dataset_name and not recipe.data.dataset_name.startswith((".", "/", "~")):
        ensure_hub_reachable()  # unreachable: offline at once (cache only), not minutes of retries
    if recipe.model.name_or_path:
        config = load_config(recipe.model.name_or_path, recipe.model.trust_remote_code)
        recipe = with_checkpoint_architecture(recipe, config)
        positions = config.max_position_embeddings
        if recipe.data.max_seq_length > positions:
            raise UserError(f"data.max_seq_length ({recipe.data.max_seq_length}) exceeds the checkpoint's "
                            f"max_position_embeddings ({positions})")
    train_files = expand_files(recipe.data.train_files, "data.train_files")
    eval_files = expand_files(recipe.data.eval_files, "data.eval_files")
    if train_files:
        check_has_text(train_files, "data.train_files")
    fingerprints = check_corpus(recipe.data, train_files, "data.train_files")  # builds the (cached) index: before any deletion
    if eval_files:
        check_corpus(recipe.data, eval_files, "data.eval_files")
    state = launch_state()
    plan = resolve(recipe, state.num_processes, log=False)  # logged by build: errors come alone
    check_launch(recipe, plan.accumulation)
    doomed = check_output_dir(recipe)
    resume = find_resume_checkpoint(recipe.resume_from, Path(recipe.output_dir) / "checkpoints") if recipe.resume_from else None
    final = Path(recipe.output_dir) / "final"
    if recipe.resume_from and resume is None:
        doomed = nothing_to_resume(recipe, final, doomed)
    point = check_resume(recipe, resume) if resume is not None else None
    if resume is not None:  # the processes and DataLoader workers the data state was saved with
        def check_saved(saved: dict) -> None:  # rank 0's loader state: its workers, then its streams
            check_saved_workers(saved, recipe.data.dataloader_num_workers)
            check_saved_data(saved, recipe.data, fingerprints)

        check_data_layout(resume, state.num_processes, check_saved)
    complete = point is not None and point.step == recipe.train.max_steps and export_step(final) == point.step
    return Checked(plan, train_files, eval_files, resume, doomed, point, complete)


def export_step(final: Path) -> int | None:
    """The step the export in ``final`` was written at (its ``eval_results.json``), None when
    there is none: a run whose last export failed (disk full) keeps the older one, which must
    not count as the finished run's."""
    try:
        return int(json.loads((final / "eval_results.json").read_text())["step"]) if (final / "config.json").is_file() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


DROPOUT_KEYS = ("hidden_dropout_prob", "attention_probs_dropout_prob")


def with_checkpoint_architecture(recipe: PretrainRecipe, config) -> PretrainRecipe:
    """With ``model.name_or_path`` the checkpoint's architecture trains, so ``model.config``
    takes its values (and ``recipe.yaml`` records them), but for the dropout keys the recipe
    sets, which apply to the checkpoint (Cramming-style continued pretraining without dropout).
    A key the recipe sets to another value is named in one warning: such keys were ignored
    while the run's recipe.yaml recorded them (found by a helper)."""
    arch = recipe.model.config
    values, ignored = {}, []
    for key in type(arch).model_fields:
        theirs = getattr(config, key, None)
        if theirs is None or (key in DROPOUT_KEYS and key in arch.model_fields_set):
            continue
        if theirs != getattr(arch, key) and key in arch.model_fields_set:
            ignored.append(f"{key} {getattr(arch, key)} -> {theirs}")
        values[key] = theirs
    if ignored and launch_state().is_main_process:  # every rank runs the preflight: one warning
        logger.warning("model.config: the checkpoint's architecture trains (model.name_or_path '%s'), not the "
                       "recipe's: %s; only the dropout keys apply to a checkpoint", recipe.model.name_or_path,
                       ", ".join(ignored))
    model = recipe.model.model_copy(update={"config": arch.model_copy(update=values)})
    return recipe.model_copy(update={"model": model})


def check_has_text(files: list[str], key: str) -> None:
    """At least one of ``files`` holds a non-blank character (reads up to the first one).

    Raises:
        UserError: every file is empty or blank.
    """
    for path in files:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 16), b""):
                if block.strip():
                    return
    if all(os.path.getsize(path) == 0 for path in files):  # the wording of the data stream's own check
        raise UserError(f"{key}: all {len(files)} file(s) are empty (e.g. {files[0]})")
    shown = f"'{files[0]}'" + (f" and {len(files) - 1} more" if len(files) > 1 else "")
    raise UserError(f"{key}: {shown} hold no text (only blank lines); add text or point {key} at other files")


def build(checked: Checked) -> tuple[Run, PretrainJob]:
    """Accelerator, run directory, tokenizer, model, optimizer, schedule, data; resumed state."""
    recipe = checked.plan.recipe
    accelerator, out = start_run(checked.plan, checked.doomed)
    tokenizer = prepare_tokenizer(recipe, out, accelerator, checked.train_files, resumed=checked.resume is not None)
    model = build_pretraining_model(recipe, tokenizer)
    objective = BertPreTrainingObjective(model, sparse_mlm_head=recipe.model.sparse_mlm_head)
    if recipe.train.torch_compile:
        objective.compile(dynamic=True)
    optimizer = build_optimizer(model, recipe.train)
    scheduler = build_scheduler(optimizer, recipe.train, recipe.train.max_steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    loader = build_pretraining_dataloader(
        recipe.data, tokenizer, checked.train_files, batch_size=recipe.train.per_device_train_batch_size,
        seed=recipe.seed, rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    state = TrainerState()
    if checked.resume is not None:
        state, data_state = load_checkpoint(accelerator, checked.resume, scheduler, optimizer)
        if data_state is not None:
            loader.load_state_dict(data_state)
        resumed(accelerator, checked.point, scheduler, recipe.train.learning_rate)
    if accelerator.is_main_process:  # after the resume's own checks: a refused resume leaves the run's recipe.yaml
        save_recipe(recipe, out)
    has_eval = bool(checked.eval_files) or bool(recipe.data.dataset_name and recipe.data.eval_dataset_split)
    evaluator = (lambda: evaluate(accelerator, objective, *eval_batches(recipe, tokenizer, checked.eval_files, accelerator),
                                  tokenizer)) if has_eval else None
    job = PretrainJob(recipe, iter(loader), accelerator.device, recipe.train.max_steps, model.config,
                      peak_flops_per_second(accelerator.device, recipe.train.peak_flops), accelerator.num_processes,
                      evaluator, loader)
    reporter = Reporter(accelerator, out, recipe.train.max_steps, initial_step=state.step, desc="pretrain")
    return Run(accelerator, objective, optimizer, scheduler, recipe, out, state, reporter), job


def export(run: Run, job: PretrainJob) -> Path:
    """Write ``output_dir/final`` (weights gathered from every rank) with the last evaluation."""
    accelerator, final = run.accelerator, run.out / "final"
    run.reporter.close()
    full_state = accelerator.get_state_dict(run.model)  # every rank: gathers FSDP/DeepSpeed shards
    if accelerator.is_main_process:
        weights = {key.removeprefix("model."): value for key, value in full_state.items()}
        tokenizer = load_tokenizer(str(run.out / "tokenizer"), key="output_dir/tokenizer")
        export_pretrained(accelerator.unwrap_model(run.model).model, tokenizer, run.recipe, final, job.results,
                          run.state.step, weights,
                          precision_by_step(run.state.extra, accelerator.mixed_precision, run.state.step))
    accelerator.wait_for_everyone()
    run.reporter.write(run.reporter.summary({"steps": run.state.step, "skipped_steps": run.state.skipped_steps,
                                             "export": str(final)}))
    finish_trackers(accelerator)
    return final


def prepare_tokenizer(recipe: PretrainRecipe, out: Path, accelerator, train_files: list[str], resumed: bool = False):
    """The run's tokenizer (see :func:`~bert_recipes.tokenizer.recipe_tokenizer`), saved in
    ``output_dir/tokenizer`` by the main process; a run ``resumed`` from a checkpoint reuses
    its saved one (a fresh start replaces what a failed attempt left)."""
    saved = out / "tokenizer"
    if accelerator.is_main_process and not (resumed and saved.is_dir()):
        save_tokenizer(recipe_tokenizer(recipe, train_files, show_progress=interactive()), saved,
                       model_max_length=recipe.model.config.max_position_embeddings)
    accelerator.wait_for_everyone()
    return load_tokenizer(str(saved), key="output_dir/tokenizer")

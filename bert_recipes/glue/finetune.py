"""``bert-recipes finetune``: GLUE fine-tuning of one task, one or several seeds.

``finetune(recipe)`` reads as preflight -> build -> train -> export:

- :func:`preflight` runs every cheap check (the checkpoint's config, label mapping,
  sequence length vs positions, the GLUE folder, DeepSpeed + accumulation, output_dir)
  before anything is written or deleted;
- :func:`build` loads the tokenizer, the classifier (:mod:`.classifier`), the featurised
  splits and batch plan (:mod:`.batching`), optimizer and schedule; restores a checkpoint;
- :func:`~bert_recipes.training.loop.train` runs the loop over a :class:`FinetuneJob`,
  which evaluates on the dev split(s) every epoch (:mod:`.evaluation`) and keeps the best
  model as a Hub-ready export in ``output_dir/best``;
- :func:`export` predicts the test split(s) with that model (``predict_test``) and writes
  ``results.json``.

``finetune_seeds(recipe)`` (:mod:`.seeds`) runs it once per seed of ``recipe.seeds`` and
reports mean and standard deviation. Layout of a run directory::

    output_dir/
      recipe.yaml, metrics.jsonl, checkpoints/     as for pretraining
      best/                  the Hub-ready export with the best dev main metric
      results.json           dev results of the best checkpoint, steps, run time
      predictions/           with predict_test: leaderboard TSVs of the test split(s) (+ AX for MNLI)
      test_predictions.json  the same as {entry: {"idx": [...], "prediction": [...]}}
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import write_json
from ..errors import UserError
from ..export import export_finetuned
from ..hub import local_or_hub
from ..data.packing import PackedFeatureCollator
from ..modeling import classification_logits, device_count, load_config
from ..recipe import save_recipe
from ..tokenizer import recipe_tokenizer
from ..training.accelerator import check_launch, finish_trackers, launch_state, start_run
from ..training.checkpoint import TRAINER_STATE, TrainerState, check_data_layout, find_resume_checkpoint, load_checkpoint
from ..training.loop import Run, train
from ..training.optim import build_optimizer, build_scheduler
from ..training.outdir import check_output_dir, release_output_dir
from ..training.plan import Resolved, resolve
from ..training.precision import precision_by_step
from ..training.resume import ResumePoint, check_resume, nothing_to_resume, resumed
from ..training.reporting import Reporter
from .batching import BatchPlan, collate_batch, load_splits
from .classifier import build_classifier
from .data import glue_task_dir, label_mapping, load_glue_split, split_fingerprint
from .metrics import comparable
from .evaluation import DEV_PREDICTIONS, TEST_PREDICTIONS, evaluate, has_test_predictions, loss_sum, predict_export, predict_test
from .recipe import FinetuneRecipe
from .reuse import RESULTS, finished_results
from .tasks import GlueTask, get_task

logger = logging.getLogger("bert_recipes")

FINETUNE_ARTEFACTS = ("best", RESULTS, TEST_PREDICTIONS, "predictions")


@dataclass(frozen=True)
class Checked:
    """What :func:`preflight` found: the resolved recipe, the task, what to resume or delete."""

    plan: Resolved
    task: GlueTask
    resume: Path | None
    doomed: list[str]
    point: ResumePoint | None = None
    train_split: dict | None = None  # the train split's fingerprint (glue.data.split_fingerprint)


def finetune(recipe: FinetuneRecipe, on_log=None) -> dict:
    """Fine-tune ``model.name_or_path`` on ``task`` with seed ``recipe.seed``.

    Args:
        on_log: optional ``callable(step, examples, seconds)`` called at every logging
            step with the training examples and wall seconds of the interval (the sweep's
            time estimate).

    Returns:
        ``results.json``'s content: ``task``, ``seed``, ``dev`` (the best evaluation's
        metrics, keys as :func:`~bert_recipes.glue.metrics.compute_metrics`), ``best``
        (export folder), ``best_step``, ``steps``, ``epochs``, ``stopped_early`` (early
        stopping ended the run), ``train_examples`` (examples trained on, each epoch's counted
        again: epochs x the training set), ``precision`` (the
        mixed precision the run trained in: ``precision: auto`` resolved),
        ``total_train_batch_size`` (sequences per optimizer step, all processes), ``runtime_s``
        (wall seconds), ``examples_per_s`` (train_examples / runtime_s) and
        ``test_predictions`` (a JSON file, or None).

    Raises:
        UserError: bad checkpoint or data, a label-set conflict, an occupied output_dir, ...
        RunStopped: stopped by SIGTERM/SIGINT after saving a checkpoint.
    """
    started, out = time.time(), Path(recipe.output_dir)
    finished = finished_results(recipe, out)
    if finished is not None:
        logger.info("%s: the run is complete (same recipe); reusing %s", out, out / RESULTS)
        if not recipe.train.keep_final_checkpoint and (out / "checkpoints").exists() and launch_state().is_main_process:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a kill after results.json left them (a helper)
        return predict_if_missing(recipe, out, finished)
    checked = preflight(recipe)
    try:
        run, job = build(checked)
        job.on_log = on_log
        train(job, run)
        return export(run, job, started)
    finally:
        release_output_dir(recipe.output_dir)


def preflight(recipe: FinetuneRecipe) -> Checked:
    """Every cheap check, before anything is written, deleted or trained.

    Raises:
        UserError: a missing checkpoint folder, its labels conflict with the task's,
            ``data.max_seq_length`` beyond its positions, no GLUE folder for the task,
            DeepSpeed with accumulation, an occupied ``output_dir``, a bad ``resume_from``,
            ``resume_from`` over an export without a checkpoint, a changed schedule on resume,
            a train split that cannot be loaded or whose labels are all hidden,
            ``init_from_task`` (a ``bert-recipes glue`` key).
    """
    task = get_task(recipe.task)
    if recipe.init_from_task:
        raise UserError(f"init_from_task ({recipe.init_from_task}) is read by `bert-recipes glue`, which runs the source "
                        "task first and drops its head; `bert-recipes finetune` runs one task: remove the key")
    train = check_inputs(recipe, task, keep=True)  # build reuses the train split
    state = launch_state()
    plan = resolve(recipe, state.num_processes, log=False)  # logged by build: errors come alone
    check_launch(recipe, plan.accumulation)
    doomed = check_output_dir(recipe, FINETUNE_ARTEFACTS)
    resume = find_resume_checkpoint(recipe.resume_from, Path(recipe.output_dir) / "checkpoints") if recipe.resume_from else None
    if recipe.resume_from and resume is None:
        doomed = nothing_to_resume(recipe, Path(recipe.output_dir) / "best", doomed, FINETUNE_ARTEFACTS)
    point = check_resume(recipe, resume) if resume is not None else None
    fingerprint = split_fingerprint(train, task)
    if resume is not None:  # the processes, and the training examples, the checkpoint's batch plan was made for
        check_data_layout(resume, state.num_processes)
        check_train_split(resume, fingerprint, recipe)
    return Checked(plan, task, resume, doomed, point, fingerprint)


def check_inputs(recipe: FinetuneRecipe, task: GlueTask, keep: bool = False, labels: bool = True):
    """The checks of what a run reads: its model and tokenizer load (weight files' headers
    included), the checkpoint's labels (``labels``; a sweep's ``init_from_task`` run starts
    from an encoder without them) and positions fit the task and ``data.max_seq_length``, the
    GLUE folder's train split is readable and labelled, its dev (and with ``predict_test``
    test) files readable. Returns the train split (``keep``: held for the run's own load).

    Raises:
        UserError / DataError: one line naming the key.
    """
    for key, source in recipe.reads().items():
        local_or_hub(source, key)
    config = load_config(recipe.model.name_or_path, recipe.model.trust_remote_code)
    if labels:
        label_mapping(task, config)  # refuses conflicting label sets
    if recipe.data.max_seq_length > config.max_position_embeddings:
        raise UserError(f"data.max_seq_length ({recipe.data.max_seq_length}) exceeds the checkpoint's "
                        f"max_position_embeddings ({config.max_position_embeddings})")
    tokenizer = recipe_tokenizer(recipe)  # loads: a folder without a vocabulary fails here, not after overwrite deleted
    if len(tokenizer) > config.vocab_size:  # its ids would index past the embeddings (an IndexError mid-run)
        raise UserError(f"tokenizer_name_or_path: the tokenizer has {len(tokenizer)} tokens but the model's embeddings "
                        f"{config.vocab_size} (model.name_or_path '{recipe.model.name_or_path}'): use the model's own "
                        "tokenizer (remove tokenizer_name_or_path) or the one it was trained with")
    if recipe.data.glue_dir is None:
        return load_glue_split(task, "train", None, keep=keep)
    glue_task_dir(recipe.data.glue_dir, task)
    train = load_glue_split(task, "train", recipe.data.glue_dir, keep=keep)
    for split in [*task.dev_splits, *(task.test_splits if recipe.predict_test else ())]:  # every file the run reads
        load_glue_split(task, split, recipe.data.glue_dir, keep=keep)
    return train


def check_train_split(path: Path, fingerprint: dict, recipe: FinetuneRecipe) -> None:
    """The checkpoint at ``path`` trained on the same train split (:func:`split_fingerprint`,
    in its trainer state; checkpoints written before it was kept are not checked).

    Raises:
        UserError: one line: another split (another ``data.glue_dir``, or edited files).
    """
    saved = json.loads((path / TRAINER_STATE).read_text()).get("extra", {}).get("train_split")
    if saved and saved != fingerprint:
        source = recipe.data.glue_dir or "the Hub"
        raise UserError(f"data.glue_dir: the {recipe.task} train split from {source} ({fingerprint['examples']} examples) "
                        f"is not the one checkpoint {path} trained on ({saved['examples']} examples, another content "
                        "hash): resume with that data, or output_dir=DIR for a new run")


def build(checked: Checked) -> tuple[Run, "FinetuneJob"]:
    """Accelerator, run directory, tokenizer, classifier, splits, batch plan, optimizer, schedule."""
    from transformers import DataCollatorWithPadding

    recipe, task = checked.plan.recipe, checked.task
    accelerator, out = start_run(checked.plan, checked.doomed)
    tokenizer = recipe_tokenizer(recipe)
    model = build_classifier(recipe, task)
    splits = load_splits(recipe, task, tokenizer)
    train_cfg = recipe.train
    plan = BatchPlan([len(ids) for ids in splits["train"]["input_ids"]], train_cfg.per_device_train_batch_size,
                     checked.plan.accumulation, recipe.seed, recipe.data.group_by_length,
                     accelerator.process_index, accelerator.num_processes)
    total_steps = checked.plan.total_steps(plan.steps_per_epoch)
    if train_cfg.torch_compile:
        model.compile(dynamic=True)
    optimizer = build_optimizer(model, train_cfg)
    scheduler = build_scheduler(optimizer, train_cfg, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainerState()
    if checked.resume is not None:
        state, _ = load_checkpoint(accelerator, checked.resume, scheduler, optimizer)
        restore_best(state, out / "best", task)
        resumed(accelerator, checked.point, scheduler, train_cfg.learning_rate)
    state.extra.setdefault("train_split", checked.train_split)  # what a resume must train on (check_train_split)
    if accelerator.is_main_process:  # after the checkpoint loaded: a failed resume leaves the run's recipe.yaml
        save_recipe(recipe, out)
    logger.info("%s: %d training examples, %d steps per epoch, %d steps", task.name, len(splits["train"]),
                plan.steps_per_epoch, total_steps)
    reporter = Reporter(accelerator, out, total_steps, initial_step=state.step, desc=f"finetune {task.name}")
    run = Run(accelerator, model, optimizer, scheduler, recipe, out, state, reporter)
    if recipe.data.packing:
        collator = PackedFeatureCollator(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of,
                                         max_seq_length=recipe.data.max_seq_length)
        logger.info("batches: each batch's examples packed into rows of up to %d tokens (data.packing: true)",
                    recipe.data.max_seq_length)
    else:
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of, return_tensors="pt")
        logger.info("batches: padded to each batch's longest example, a multiple of %d%s (data.packing: false)",
                    recipe.data.pad_to_multiple_of, ", grouped by length" if recipe.data.group_by_length else "")
    return run, FinetuneJob(run, task, tokenizer, splits, collator, plan, total_steps)


class FinetuneJob:
    """Fine-tuning for the loop: the loss is the mean over all examples of a window on all
    ranks; evaluation at the end of every epoch, every ``train.eval_steps`` and at the last
    step, the best dev ``task.main_metric`` exported to ``output_dir/best``."""

    loss_terms = {"loss_sum": "examples"}

    def __init__(self, run: Run, task: GlueTask, tokenizer, splits: dict, collator, plan: BatchPlan, total_steps: int):
        self.run, self.task, self.tokenizer, self.splits, self.collator = run, task, tokenizer, splits, collator
        self.plan, self.total_steps = plan, total_steps
        self.device = run.accelerator.device
        self.results: dict = {}
        self.predictions: dict = {}  # the last evaluation's, per dev split (glue.evaluation.evaluate)
        self.on_log = None  # callable(step, examples, seconds) or None
        if run.state.extra.get("stopped_early"):  # resumed after early stopping: nothing left to train
            self.total_steps = run.state.step

    def window(self, step: int) -> list[dict]:
        ids = self.plan.window(step)
        extra = self.run.state.extra  # examples trained on, all ranks (about: padded ranks repeat batches)
        extra["train_examples"] = extra.get("train_examples", 0) + sum(map(len, ids)) * self.plan.world
        return [collate_batch(self.splits["train"], batch, self.collator, self.device) for batch in ids]

    def counts(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"examples": device_count(len(batch["labels"]), self.device)}

    def forward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        mask = batch["attention_mask"]
        logits = classification_logits(model, batch, self.run.accelerator.unwrap_model)
        return {"loss_sum": loss_sum(logits, batch["labels"], self.task),
                "examples": device_count(len(batch["labels"]), self.device),
                "tokens": mask.sum(), "padded_tokens": device_count(mask.numel(), self.device)}

    def metrics(self, sums: dict[str, float], elapsed: float, step: int) -> dict:
        if self.on_log is not None:
            self.on_log(step, sums["examples"], elapsed)
        return {
            "loss": sums["loss_sum"] / sums["examples"],
            "samples_per_s": sums["examples"] / elapsed,
            "tokens_per_s": sums["tokens"] / elapsed,
            "padding_fraction": 1.0 - sums["tokens"] / sums["padded_tokens"],
            "epoch": round(step / self.plan.steps_per_epoch, 4),
        }

    def evaluates_at(self, step: int) -> bool:
        every = self.run.recipe.train.eval_steps
        return step % self.plan.steps_per_epoch == 0 or step == self.total_steps or bool(every and step % every == 0)

    def evaluate(self) -> dict:
        run = self.run
        self.results, record, self.predictions = evaluate(run.accelerator, run.model, self.task, self.splits,
                                                          self.collator, run.recipe.train.per_device_eval_batch_size)
        return {"epoch": round(run.state.step / self.plan.steps_per_epoch, 4), **record}

    def after_evaluation(self, record: dict, step: int) -> None:
        """Export the model to ``output_dir/best`` when its main metric beats the best so far;
        with ``train.early_stopping_patience``, end the run after that many evaluations in a
        row without improvement (the loop stops when ``total_steps`` reaches the step)."""
        run, state, main = self.run, self.run.state, self.task.main_metric
        if state.extra.get("best_step") is not None and comparable(self.results[main]) <= comparable(state.best_metric):
            state.extra["evals_since_best"] = state.extra.get("evals_since_best", 0) + 1
            patience = run.recipe.train.early_stopping_patience
            if patience and state.extra["evals_since_best"] >= patience and step < self.total_steps:
                logger.info("early stopping at step %d: %d evaluations without a better %s (best %.4f at step %d)",
                            step, patience, main, state.best_metric, state.extra["best_step"])
                state.extra["stopped_early"] = True
                self.total_steps = step
            return
        state.best_metric = self.results[main]
        state.extra.update(best_step=step, best_results=self.results, evals_since_best=0)
        full_state = run.accelerator.get_state_dict(run.model)  # every rank: gathers FSDP/DeepSpeed shards
        if run.accelerator.is_main_process:
            export_finetuned(run.accelerator.unwrap_model(run.model), self.tokenizer, run.recipe, self.task,
                             run.out / "best", self.results, step, full_state,
                             precision_by_step(state.extra, run.accelerator.mixed_precision, step),
                             {DEV_PREDICTIONS: self.predictions}, self.splits["subsampled"])
        run.accelerator.wait_for_everyone()

    def data_state(self) -> None:
        return None  # the batches of a step are a pure function of (seed, step)


def export(run: Run, job: FinetuneJob, started: float) -> dict:
    """The run's results (and test predictions with ``predict_test``), written to ``results.json``;
    then, with ``train.keep_final_checkpoint: false``, its ``checkpoints/`` deleted."""
    run.reporter.close()
    state, out, task = run.state, run.out, job.task
    results = {
        "task": task.name,
        "seed": run.recipe.seed,
        "dev": state.extra.get("best_results", {}),
        "best": str(out / "best"),
        "best_step": state.extra.get("best_step"),
        "steps": state.step,
        "epochs": round(state.step / job.plan.steps_per_epoch, 4),
        "stopped_early": bool(state.extra.get("stopped_early")),
        "train_examples": int(state.extra.get("train_examples", 0)),
        "precision": run.accelerator.mixed_precision,  # what precision: auto resolved to here ("bf16", "no", ...)
        "total_train_batch_size": (run.recipe.train.per_device_train_batch_size * run.accelerator.num_processes
                                   * run.recipe.train.gradient_accumulation_steps),  # grows with the processes
        "subsampled": job.splits["subsampled"],  # data.max_*_samples that cut a split (glue.batching.load_splits)
        "test_predictions": None,
    }
    if run.recipe.predict_test:
        results["test_predictions"] = str(predict_test(run.accelerator, run.recipe, task, job.splits, job.collator, out))
    results["runtime_s"] = round(time.time() - started, 1)
    results["examples_per_s"] = round(results["train_examples"] / max(results["runtime_s"], 1e-9), 2)
    if run.accelerator.is_main_process:
        write_json(out / RESULTS, results)
        if not run.recipe.train.keep_final_checkpoint:  # after results.json: a crash between leaves a finished run
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # (part of a checkpoint fails its manifest)
            logger.info("%s: checkpoints deleted (train.keep_final_checkpoint: false)", out / "checkpoints")
    run.reporter.write(run.reporter.summary({"steps": state.step, "best_step": results["best_step"],
                                             **{f"best_{k}": v for k, v in results["dev"].items()}, "best": results["best"]}))
    finish_trackers(run.accelerator)
    return results


def predict_if_missing(recipe: FinetuneRecipe, out: Path, results: dict) -> dict:
    """A reused finished run's ``results``, with test predictions when ``predict_test`` asks
    for them: when ``out`` lacks them (the run trained without ``predict_test``, or a file of
    them was deleted) its export predicts them; ``results.json`` records their path in ``out``.

    Raises:
        UserError / DataError: no export in ``out/best``, missing test data.
    """
    if not recipe.predict_test:
        return results
    path = out / TEST_PREDICTIONS
    if not has_test_predictions(out):
        logger.info("%s: predicting the test split(s) with the finished run's export", out)
        path = predict_export(recipe, out)
    elif results.get("test_predictions") == str(path):
        return results
    results = {**results, "test_predictions": str(path)}
    if launch_state().is_main_process:
        write_json(out / RESULTS, results)
    return results


def restore_best(state: TrainerState, best: Path, task: GlueTask) -> None:
    """After a resume, the export on disk is the best so far (it may be newer than the checkpoint)."""
    saved = best / "eval_results.json"
    if not saved.is_file():
        return
    record = json.loads(saved.read_text())
    if record.get("step", 0) > (state.extra.get("best_step") or 0):
        results = {key: record[key] for key in task.metrics if key in record}
        state.best_metric = results.get(task.main_metric)
        state.extra.update(best_step=record["step"], best_results=results)


__all__ = ["FinetuneJob", "finetune", "preflight"]

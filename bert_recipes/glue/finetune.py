"""GLUE fine-tuning of one task, top to bottom.

``finetune(recipe)``: tokenizer -> ``BertForSequenceClassification`` on the checkpoint ->
GLUE splits -> Accelerate loop (AdamW, linear warmup and decay) -> evaluation on the dev
split(s) every epoch -> the best checkpoint exported to ``output_dir/best`` -> with
``predict_test``, the test split(s) predicted by that best model.
``finetune_seeds(recipe)`` runs it once per seed of ``recipe.seeds`` and reports mean and
standard deviation.

Conventions shared with pretraining (:mod:`bert_recipes.pretrain`): ``metrics.jsonl``
through the Reporter, precision and trackers from the recipe, an occupied ``output_dir``
refused unless ``overwrite`` or ``resume_from``, checkpoints every ``train.save_steps`` and
on SIGTERM/SIGINT, resumable with ``resume_from=latest``. The loss of a step is the mean
over all examples of its accumulation window on all ranks, as one large batch would give.

Batches are padded per batch to a multiple of ``data.pad_to_multiple_of``
(``DataCollatorWithPadding``); with ``data.group_by_length`` the examples of a batch have
similar lengths (less padding), the grouping being random but a pure function of
(seed, epoch), so a resumed run sees exactly the batches the interrupted one would have.

Test labels are hidden (-1) and never read: test splits are featurised without ``labels``
and only go through :func:`predict`.

Layout of a run directory::

    output_dir/
      recipe.yaml, metrics.jsonl, checkpoints/     as for pretraining
      best/                  the Hub-ready export with the best dev main metric
      results.json           dev results of the best checkpoint, steps, run time
      predictions/           with predict_test: leaderboard TSVs of the test split(s) (+ AX for MNLI)
      test_predictions.json  the same as {entry: {"idx": [...], "prediction": [...]}}
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, UserError
from ..export import export_finetuned
from ..hub import load_local_or_hub, local_or_hub
from ..modeling import load_pretrained
from ..pretrain import resolve_batch_size
from ..recipe import save_recipe
from ..tokenizer import load_tokenizer
from ..training.checkpoint import TrainerState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from ..training.loop import StopRequest, in_lockstep, make_accelerator, optimizer_step, prepare_output_dir
from ..training.optim import build_optimizer, build_scheduler
from ..training.reporting import Reporter, progress
from .data import label_mapping, load_glue_split, tokenize_glue
from .metrics import compute_metrics
from .recipe import FinetuneRecipe
from .submission import write_submission
from .tasks import GlueTask, get_task

logger = logging.getLogger("bert_recipes")

RESULTS = "results.json"
TEST_PREDICTIONS = "test_predictions.json"
FINETUNE_ARTEFACTS = ("best", RESULTS, TEST_PREDICTIONS, "predictions")
# Length grouping as transformers' LengthGroupedSampler: examples are shuffled, cut into
# "mega-batches" of this many batches, and sorted by length inside each one.
MEGABATCH_BATCHES = 50
# Sums reduced across ranks after every step, in this order.
STEP_SUMS = ("loss_sum", "examples", "tokens", "padded_tokens", "stop")


# --------------------------------------------------------------------------- several seeds


def finetune_seeds(recipe: FinetuneRecipe) -> dict:
    """Run the recipe once per seed of ``recipe.seeds`` (one run with ``seed`` when empty).

    Each seed runs into ``output_dir/seed-<s>``; ``output_dir/results.json`` gets the dev
    metrics of every seed, their mean (``dev``) and sample standard deviation
    (``dev_std``), and the best seed by the task's main metric, whose export (``best``)
    and test predictions stand for the recipe.
    """
    if not recipe.seeds:
        return finetune(recipe)
    task = get_task(recipe.task)
    out = Path(recipe.output_dir)
    if (out / RESULTS).exists() and not (recipe.overwrite or recipe.resume_from):
        raise UserError(f"output_dir: '{out}' already holds a run ({RESULTS}); "
                        "set resume_from=latest to continue it or overwrite=true to replace it")
    runs = {}
    for seed in recipe.seeds:
        sub = recipe.model_copy(update={"seed": seed, "seeds": [], "output_dir": str(out / f"seed-{seed}")})
        result = finetune(sub)
        if result.get("stopped"):
            return result
        runs[seed] = result
    results = aggregate_seeds(task, runs)
    results["runtime_s"] = round(sum(r.get("runtime_s") or 0.0 for r in runs.values()), 1)  # all seeds
    from accelerate import PartialState

    if PartialState().is_main_process:
        save_recipe(recipe, out)
        _write_json(out / RESULTS, results)
    return results


def aggregate_seeds(task: GlueTask, runs: dict[int, dict]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of the seeds' dev metrics."""
    keys = [key for key in task.metrics if all(key in r["dev"] for r in runs.values())]
    values = {key: [float(r["dev"][key]) for r in runs.values()] for key in keys}
    best_seed = max(runs, key=lambda s: _comparable(runs[s]["dev"].get(task.main_metric)))
    return {
        "task": task.name,
        "seeds": list(runs),
        "dev": {key: statistics.fmean(v) for key, v in values.items()},
        "dev_std": {key: statistics.stdev(v) if len(v) > 1 else 0.0 for key, v in values.items()},
        "runs": {str(seed): r["dev"] for seed, r in runs.items()},
        "best_seed": best_seed,
        "best": runs[best_seed]["best"],
        "test_predictions": runs[best_seed].get("test_predictions"),
    }


# --------------------------------------------------------------------------- one run


def finetune(recipe: FinetuneRecipe) -> dict:
    """Fine-tune ``model.name_or_path`` on ``task`` with seed ``recipe.seed``.

    Returns:
        ``results.json``'s content: ``task``, ``seed``, ``dev`` (the best evaluation's
        metrics, keys as :func:`~bert_recipes.glue.metrics.compute_metrics`), ``best``
        (export folder), ``best_step``, ``steps``, ``runtime_s`` and ``test_predictions``
        (a JSON file, or None). When stopped by a signal: ``{"stopped": True, ...}``.

    Raises:
        UserError: bad checkpoint or data, a label-set conflict, an occupied output_dir, ...
    """
    started = time.time()
    task = get_task(recipe.task)
    out = Path(recipe.output_dir)
    if recipe.resume_from and (out / RESULTS).is_file():
        logger.info("%s: already finished; reusing %s", out, out / RESULTS)
        return json.loads((out / RESULTS).read_text())
    local_or_hub(recipe.model.name_or_path, "model.name_or_path")  # a missing folder fails before anything is written
    accelerator = make_accelerator(recipe)
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    recipe = resolve_batch_size(recipe, accelerator.num_processes, log=accelerator.is_main_process)
    out = prepare_output_dir(recipe, accelerator)
    if recipe.overwrite and not recipe.resume_from and accelerator.is_main_process:
        _remove(out, FINETUNE_ARTEFACTS)
    resume = find_resume_checkpoint(recipe.resume_from, out / "checkpoints") if recipe.resume_from else None

    tokenizer = load_tokenizer(recipe.tokenizer_name_or_path or recipe.model.name_or_path,
                               key="tokenizer_name_or_path" if recipe.tokenizer_name_or_path else "model.name_or_path",
                               trust_remote_code=recipe.model.trust_remote_code)
    model = build_classifier(recipe, task)
    if recipe.data.max_seq_length > model.config.max_position_embeddings:
        raise UserError(f"data.max_seq_length ({recipe.data.max_seq_length}) exceeds the checkpoint's "
                        f"max_position_embeddings ({model.config.max_position_embeddings})")
    splits = load_splits(recipe, task, tokenizer)
    if accelerator.is_main_process:
        save_recipe(recipe, out)

    from transformers import DataCollatorWithPadding

    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of, return_tensors="pt")
    train = recipe.train
    plan = BatchPlan([len(ids) for ids in splits["train"]["input_ids"]], train.per_device_train_batch_size,
                     train.gradient_accumulation_steps, recipe.seed, recipe.data.group_by_length,
                     accelerator.process_index, accelerator.num_processes)
    total_steps = train.max_steps or math.ceil(train.num_train_epochs * plan.steps_per_epoch)
    if train.torch_compile:
        model.compile(dynamic=True)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    state = TrainerState()
    if resume is not None:
        state, _ = load_checkpoint(accelerator, resume)
        scheduler.load_state_dict(state.extra["scheduler"])
        _restore_best(state, out / "best", task)
        logger.info("resumed from %s at step %d", resume, state.step)

    logger.info("%s: %d training examples, %d steps per epoch, %d steps", task.name, len(splits["train"]),
                plan.steps_per_epoch, total_steps)
    reporter = Reporter(accelerator, out, total_steps, initial_step=state.step, desc=f"finetune {task.name}")
    interval = torch.zeros(len(STEP_SUMS), dtype=torch.float64)
    interval_start = time.perf_counter()
    model.train()
    with StopRequest() as stop:
        while state.step < total_steps:
            window = [_batch(splits["train"], ids, collator, accelerator.device) for ids in plan.window(state.step)]
            sums = forward_backward(accelerator, model, window, task)
            sums[STEP_SUMS.index("stop")] = float(stop.requested is not None)
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu().double()
            step_loss = float(sums[0] / sums[1])
            grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, step_loss, train.max_grad_norm,
                                       state, train.max_consecutive_nonfinite_steps)
            state.step += 1
            interval += sums
            reporter.advance(1, loss=step_loss)

            epoch = state.step / plan.steps_per_epoch
            if state.step % train.logging_steps == 0 or state.step == total_steps:
                record = interval_metrics(interval, time.perf_counter() - interval_start)
                record.update(epoch=round(epoch, 4), lr=scheduler.get_last_lr()[0], grad_norm=grad_norm,
                              skipped_steps=state.skipped_steps)
                reporter.log(record, state.step)
                interval.zero_()
                interval_start = time.perf_counter()
            end_of_epoch = state.step % plan.steps_per_epoch == 0
            if end_of_epoch or state.step == total_steps or (train.eval_steps and state.step % train.eval_steps == 0):
                results, record = evaluate(accelerator, model, task, splits, collator, train.per_device_eval_batch_size)
                reporter.log({"epoch": round(epoch, 4), **record}, state.step)
                first = state.extra.get("best_step") is None
                if first or _comparable(results[task.main_metric]) > _comparable(state.best_metric):
                    state.best_metric = results[task.main_metric]
                    state.extra.update(best_step=state.step, best_results=results)
                    full_state = accelerator.get_state_dict(model)  # every rank: gathers FSDP/DeepSpeed shards
                    if accelerator.is_main_process:
                        export_finetuned(accelerator.unwrap_model(model), tokenizer, recipe, task, out / "best",
                                         results, state.step, full_state)
                    accelerator.wait_for_everyone()
            stopping = bool(sums[STEP_SUMS.index("stop")] > 0)
            if stopping or (train.save_steps and state.step % train.save_steps == 0 and state.step < total_steps):
                state.extra["scheduler"] = scheduler.state_dict()
                path = save_checkpoint(accelerator, model, out / "checkpoints", state, recipe, None, train.save_total_limit)
                if stopping:
                    reporter.close()
                    reporter.write(f"stopped by {stop.requested or 'a signal'} at step {state.step}; checkpoint {path}; "
                                   "resume with resume_from=latest")
                    accelerator.end_training()
                    return {"task": task.name, "stopped": True, "checkpoint": str(path), "step": state.step}
    reporter.close()

    results = {
        "task": task.name,
        "seed": recipe.seed,
        "dev": state.extra.get("best_results", {}),
        "best": str(out / "best"),
        "best_step": state.extra.get("best_step"),
        "steps": state.step,
        "epochs": round(state.step / plan.steps_per_epoch, 4),
        "test_predictions": None,
    }
    if recipe.predict_test:
        results["test_predictions"] = str(predict_test(accelerator, recipe, task, splits, collator, out))
    results["runtime_s"] = round(time.time() - started, 1)
    if accelerator.is_main_process:
        _write_json(out / RESULTS, results)
    reporter.write(reporter.summary({"steps": state.step, "best_step": results["best_step"],
                                     **{f"best_{k}": v for k, v in results["dev"].items()}, "best": results["best"]}))
    accelerator.end_training()
    return results


# --------------------------------------------------------------------------- model


def build_classifier(recipe: FinetuneRecipe, task: GlueTask):
    """A ``BertForSequenceClassification`` for ``task`` on ``model.name_or_path``.

    The checkpoint's encoder (and pooler) are loaded; the classifier head is new unless the
    checkpoint has one for the same label names (reordered by name if needed, see
    :func:`~bert_recipes.glue.data.label_mapping`). Heads of pretraining (``cls.*``) are
    dropped silently; any other missing or unexpected weight is a warning.

    Raises:
        UserError: unloadable checkpoint, or its labels conflict with the task's.
    """
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    spec = recipe.model
    config = _load_config(spec.name_or_path, spec.trust_remote_code)
    mapping = label_mapping(task, config)  # refuses conflicting label sets
    keep_head = mapping is not None or (not _generic_labels(config) and len(config.id2label) == task.num_labels)
    labels = {} if mapping is not None else {"num_labels": task.num_labels, "id2label": task.id2label,
                                             "label2id": task.label2id}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # transformers' load report: replaced by the lines below
    try:
        model, info = load_pretrained(
            BertForSequenceClassification, spec.name_or_path, trust_remote_code=spec.trust_remote_code,
            attn_implementation=spec.attn_implementation, output_loading_info=True,
            ignore_mismatched_sizes=not keep_head, **labels,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    if mapping is not None:
        _reorder_head(model, mapping)
    model.config.id2label, model.config.label2id = task.id2label, task.label2id
    model.config.problem_type = "regression" if task.is_regression else "single_label_classification"
    model.config.finetuning_task = task.name
    _report_loading(info, spec.name_or_path, resuming=bool(recipe.resume_from))
    return model


def _load_config(name_or_path: str, trust_remote_code: bool):
    from transformers import AutoConfig

    return load_local_or_hub(AutoConfig.from_pretrained, name_or_path, "model.name_or_path",
                             trust_remote_code=trust_remote_code)


def _generic_labels(config) -> bool:
    names = [str(v).lower() for v in (config.id2label or {}).values()]
    return all(name.startswith("label_") for name in names)


def _reorder_head(model, mapping: dict[int, int]) -> None:
    """Permute the classifier's outputs so that output i is the task's class i."""
    order = torch.tensor([mapping[i] for i in range(len(mapping))])
    with torch.no_grad():
        model.classifier.weight.copy_(model.classifier.weight[order].clone())
        model.classifier.bias.copy_(model.classifier.bias[order].clone())
    logger.info("checkpoint classifier reordered to the task's label order by name")


def _report_loading(info: dict, name_or_path: str, resuming: bool = False) -> None:
    fresh = sorted(k for k in info["missing_keys"] if k.startswith("classifier."))
    fresh += sorted(k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ()))
    other_missing = sorted(k for k in info["missing_keys"] if not k.startswith("classifier."))
    unexpected = sorted(k for k in info["unexpected_keys"] if not k.startswith("cls."))
    if fresh:
        logger.info("classifier head initialised fresh (%s)%s", ", ".join(sorted(set(fresh))),
                    "; a resumed run then loads its checkpoint's" if resuming else "")
    if other_missing:
        logger.warning("%s lacks %d weight(s), initialised fresh: %s", name_or_path, len(other_missing),
                       ", ".join(other_missing[:8]))
    if unexpected:
        logger.warning("%s has %d weight(s) a BertForSequenceClassification does not use: %s", name_or_path,
                       len(unexpected), ", ".join(unexpected[:8]))


# --------------------------------------------------------------------------- data


def load_splits(recipe: FinetuneRecipe, task: GlueTask, tokenizer) -> dict:
    """Featurised splits: ``train``, the dev splits, and with ``predict_test`` the test
    split(s) (and AX for MNLI, when available). Raw (untokenised) splits are kept under
    ``raw/<split>`` for their ``idx`` and dev labels."""
    data = recipe.data
    wanted = ["train", *task.dev_splits] + (list(task.test_splits) if recipe.predict_test else [])
    raw = {split: load_glue_split(task, split, data.glue_dir) for split in wanted}
    if recipe.predict_test and task.name == "mnli":
        try:
            raw["ax"] = load_glue_split("ax", "test", data.glue_dir)
        except DataError as exc:
            logger.warning("AX not predicted: %s", exc)
    if data.max_train_samples:
        raw["train"] = raw["train"].select(range(min(data.max_train_samples, len(raw["train"]))))
    if data.max_eval_samples:
        for split in task.dev_splits:
            raw[split] = raw[split].select(range(min(data.max_eval_samples, len(raw[split]))))
    splits = {}
    for split, dataset in raw.items():
        source = get_task("ax") if split == "ax" else task
        splits[split] = tokenize_glue(dataset, source, tokenizer, data.max_seq_length)
        splits[f"raw/{split}"] = dataset
    if not len(splits["train"]):
        raise DataError(f"GLUE {task.name}: the train split is empty")
    return splits


class BatchPlan:
    """The training batches of every rank at every step, a pure function of (seed, epoch).

    An epoch is ``ceil(N / batch_size)`` batches: the examples are shuffled and, with
    ``group_by_length``, sorted by length inside mega-batches of ``MEGABATCH_BATCHES``
    batches; batch order is then shuffled with the longest batch first (an out-of-memory
    error shows at once). With several ranks the batch list is padded by repeating its
    first batches to a multiple of ``world``; rank r takes batches r, r + world, ...
    A step takes ``accumulation`` consecutive batches of the rank (fewer at the epoch's end).
    """

    def __init__(self, lengths: list[int], batch_size: int, accumulation: int, seed: int, group_by_length: bool,
                 rank: int = 0, world: int = 1):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.accumulation, self.seed = batch_size, accumulation, seed
        self.group_by_length, self.rank, self.world = group_by_length, rank, world
        per_rank = math.ceil(math.ceil(len(lengths) / batch_size) / world)
        self.steps_per_epoch = math.ceil(per_rank / accumulation)
        self._cache: tuple[int, list] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of ``epoch`` (example indices), before sharding across ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        size = self.batch_size
        if self.group_by_length:
            mega = size * MEGABATCH_BATCHES
            chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
            batches.insert(0, batches.pop(longest))
        missing = -len(batches) % self.world
        return batches + [batches[i % len(batches)] for i in range(missing)]

    def window(self, step: int) -> list[np.ndarray]:
        """This rank's micro-batches for global optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.epoch_batches(epoch)[self.rank::self.world])
        mine = self._cache[1]
        return mine[k * self.accumulation:(k + 1) * self.accumulation]


def _batch(dataset, indices, collator, device) -> dict:
    rows = dataset[[int(i) for i in indices]]
    features = [dict(zip(rows, values)) for values in zip(*rows.values())]
    return {key: value.to(device, non_blocking=True) for key, value in collator(features).items()}


# --------------------------------------------------------------------------- training step


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: GlueTask) -> torch.Tensor:
    """Summed cross-entropy (classes) or squared error (STS-B regression) in float32."""
    if task.is_regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")


def forward_backward(accelerator, model, window: list[dict], task: GlueTask) -> torch.Tensor:
    """Forward and backward over one accumulation window; return this rank's STEP_SUMS.

    The loss of micro-batch k is ``world * loss_sum_k / N`` with N the number of examples
    of the whole window on all ranks, so DDP's gradient mean gives the gradient of the
    global mean loss. Gradients are synchronised only on the last micro-batch.
    """
    world = accelerator.num_processes
    count = torch.tensor(float(sum(len(b["labels"]) for b in window)), dtype=torch.float64, device=accelerator.device)
    examples = float(accelerator.reduce(count, reduction="sum"))
    sums = torch.zeros(len(STEP_SUMS), dtype=torch.float64)
    for k, batch in enumerate(window):
        sync = k == len(window) - 1
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        with (contextlib.nullcontext() if sync else accelerator.no_sync(model)):
            loss_sum = _loss_sum(model(**inputs).logits, labels, task)
            accelerator.backward(world * loss_sum / examples)
        sums[0] += float(loss_sum.detach())
        sums[1] += len(labels)
        sums[2] += float(batch["attention_mask"].sum())
        sums[3] += batch["attention_mask"].numel()
    return sums


def interval_metrics(sums: torch.Tensor, elapsed: float) -> dict:
    """Mean loss, throughput and padding over a logging interval of global sums."""
    loss_sum, examples, tokens, padded, _ = sums.tolist()
    return {
        "loss": loss_sum / examples,
        "samples_per_s": examples / elapsed,
        "tokens_per_s": tokens / elapsed,
        "padding_fraction": 1.0 - tokens / padded,
    }


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def predict(accelerator, model, dataset, collator, batch_size: int) -> np.ndarray:
    """Outputs for every example of ``dataset``, in its order: logits [N, C] or scores [N].

    Reads only the model inputs (never ``labels``). Examples are sorted by length into
    batches (little padding) and the batches dealt to the ranks; outputs are gathered.
    """
    from accelerate.utils import gather_object

    lengths = np.asarray([len(ids) for ids in dataset["input_ids"]])
    order = np.argsort(-lengths, kind="stable")
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    inputs = [name for name in ("input_ids", "token_type_ids", "attention_mask") if name in dataset.column_names]
    features = dataset.select_columns(inputs)
    unwrapped = accelerator.unwrap_model(model)
    was_training = unwrapped.training
    unwrapped.eval()
    mine = []
    my_batches = progress(batches[accelerator.process_index::accelerator.num_processes], desc="eval",
                          main=accelerator.is_main_process, leave=False)
    for indices, real in in_lockstep(accelerator, my_batches, lambda: batches[0]):
        with accelerator.autocast():
            logits = unwrapped(**_batch(features, indices, collator, accelerator.device)).logits
        if real:
            mine.extend(zip(indices.tolist(), logits.float().cpu().numpy()))
    unwrapped.train(was_training)
    gathered = sorted(gather_object(mine), key=lambda pair: pair[0])
    outputs = np.stack([value for _, value in gathered]) if gathered else np.zeros((0, unwrapped.config.num_labels))
    return outputs[:, 0] if unwrapped.config.problem_type == "regression" else outputs


def evaluate(accelerator, model, task: GlueTask, splits: dict, collator, batch_size: int) -> tuple[dict, dict]:
    """Metrics on every dev split (MNLI: matched and mismatched).

    Returns:
        ``(results, record)``: the task's metrics (``compute_metrics`` keys) and the
        ``eval_``-prefixed record for metrics.jsonl, with the mean dev loss.
    """
    started = time.perf_counter()
    results, loss_sum, count = {}, 0.0, 0
    for split in task.dev_splits:
        outputs = predict(accelerator, model, splits[split], collator, batch_size)
        references = np.asarray(splits[f"raw/{split}"]["label"])
        results.update(compute_metrics(task, outputs, references, split=split))
        loss_sum += float(_loss_sum(torch.as_tensor(outputs if not task.is_regression else outputs[:, None]),
                                    torch.as_tensor(references), task))
        count += len(references)
    record = {f"eval_{key}": value for key, value in results.items()}
    record.update(eval_loss=loss_sum / count, eval_runtime_s=round(time.perf_counter() - started, 3))
    return results, record


def predict_test(accelerator, recipe: FinetuneRecipe, task: GlueTask, splits: dict, collator, out: Path) -> Path:
    """Predict the test split(s) (and AX for MNLI) with the best export; write them.

    Writes ``out/test_predictions.json`` (class ids, or scores for STS-B) and the
    leaderboard TSVs under ``out/predictions``. Returns the JSON path.
    """
    from transformers import BertForSequenceClassification

    best = load_pretrained(BertForSequenceClassification, str(out / "best"), key="output_dir/best")
    best = best.to(accelerator.device)
    entries = {}
    for split in (*task.test_splits, "ax"):
        if split not in splits:
            continue
        outputs = predict(accelerator, best, splits[split], collator, recipe.train.per_device_eval_batch_size)
        values = outputs.tolist() if task.is_regression else outputs.argmax(-1).tolist()
        entries[_entry(task, split)] = {"idx": list(splits[f"raw/{split}"]["idx"]), "prediction": values}
    path = out / TEST_PREDICTIONS
    if accelerator.is_main_process:
        _write_json(path, entries)
        write_submission({name: (e["idx"], e["prediction"]) for name, e in entries.items()}, out / "predictions")
    accelerator.wait_for_everyone()
    return path


def _entry(task: GlueTask, split: str) -> str:
    """The submission entry of a test split: ``sst2``, ``mnli-m``, ``mnli-mm``, ``ax``."""
    if split == "ax":
        return "ax"
    return {"test_matched": "mnli-m", "test_mismatched": "mnli-mm"}.get(split, task.name)


# --------------------------------------------------------------------------- helpers


def _comparable(value) -> float:
    """A main-metric value for ``>``: None and nan rank below everything."""
    if value is None or not math.isfinite(float(value)):
        return -math.inf
    return float(value)


def _restore_best(state: TrainerState, best: Path, task: GlueTask) -> None:
    """After a resume, the export on disk is the best so far (it may be newer than the checkpoint)."""
    saved = best / "eval_results.json"
    if not saved.is_file():
        return
    record = json.loads(saved.read_text())
    if record.get("step", 0) > (state.extra.get("best_step") or 0):
        results = {key: record[key] for key in task.metrics if key in record}
        state.best_metric = results.get(task.main_metric)
        state.extra.update(best_step=record["step"], best_results=results)


def _remove(out: Path, names) -> None:
    import shutil

    for name in names:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    os.replace(tmp, path)


__all__ = ["BatchPlan", "aggregate_seeds", "build_classifier", "evaluate", "finetune", "finetune_seeds", "predict"]

"""Fine-tuning evaluation and prediction: dev metrics, test predictions, leaderboard files.

Test labels are hidden (-1) and never read: test splits only go through :func:`predict`,
which reads the model inputs alone.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_json
from ..errors import UserError
from ..modeling import classification_logits, load_pretrained
from ..training.accelerator import in_lockstep
from ..training.reporting import progress
from .batching import collate_batch
from .classifier import use_float32_head
from .metrics import compute_metrics
from .submission import write_submission
from .tasks import GlueTask, leaderboard_entry, predicted_by, submission_entry

TEST_PREDICTIONS = "test_predictions.json"
#: The dev predictions of a run's best model, in its export (``best/``).
DEV_PREDICTIONS = "dev_predictions.json"


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, task: GlueTask) -> torch.Tensor:
    """Summed cross-entropy (classes; logits [B, C], labels [B] ids) or squared error (STS-B
    regression; logits [B, 1], labels [B] scores) in float32: a 0-d tensor, nats or score^2."""
    if task.is_regression:
        return F.mse_loss(logits.float().squeeze(-1), labels.float(), reduction="sum")
    return F.cross_entropy(logits.float(), labels, reduction="sum")


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
            logits = classification_logits(unwrapped, collate_batch(features, indices, collator, accelerator.device))
        if real:
            mine.extend(zip(indices.tolist(), logits.float().cpu().numpy()))
    unwrapped.train(was_training)
    gathered = sorted(gather_object(mine), key=lambda pair: pair[0])
    outputs = np.stack([value for _, value in gathered]) if gathered else np.zeros((0, unwrapped.config.num_labels))
    return outputs[:, 0] if unwrapped.config.problem_type == "regression" else outputs


def evaluate(accelerator, model, task: GlueTask, splits: dict, collator, batch_size: int) -> tuple[dict, dict, dict]:
    """Metrics on every dev split (MNLI: matched and mismatched).

    Returns:
        ``(results, record, predictions)``: the task's metrics (``compute_metrics`` keys), the
        ``eval_``-prefixed record for metrics.jsonl with the mean dev loss, and per dev split
        its examples' ``idx``, ``label`` and ``prediction`` (class id, or STS-B's score) and,
        for classification, ``logits`` (what :data:`DEV_PREDICTIONS` holds, for checking the
        metrics or an error analysis).
    """
    started = time.perf_counter()
    results, total_loss, count, predictions = {}, 0.0, 0, {}
    for split in task.dev_splits:
        outputs = predict(accelerator, model, splits[split], collator, batch_size)
        references = np.asarray(splits[f"raw/{split}"]["label"])
        results.update(compute_metrics(task, outputs, references, split=split))
        predictions[split] = {"idx": list(splits[f"raw/{split}"]["idx"]), "label": references.tolist(),
                              "prediction": outputs.tolist() if task.is_regression else outputs.argmax(-1).tolist()}
        if not task.is_regression:
            predictions[split]["logits"] = outputs.tolist()
        total_loss += float(loss_sum(torch.as_tensor(outputs if not task.is_regression else outputs[:, None]),
                                    torch.as_tensor(references), task))
        count += len(references)
    record = {f"eval_{key}": value for key, value in results.items()}
    record.update(eval_loss=total_loss / count, eval_runtime_s=round(time.perf_counter() - started, 3))
    return results, record, predictions


def predict_test(accelerator, recipe: FinetuneRecipe, task: GlueTask, splits: dict, collator, out: Path) -> Path:
    """Predict the test split(s) (and those of the tasks predicted with this one's model: AX
    for MNLI) with the best export; write them.

    Writes ``out/test_predictions.json`` (class ids, or scores for STS-B) and the
    leaderboard TSVs under ``out/predictions``. Returns the JSON path.
    """
    from transformers import BertForSequenceClassification

    best = load_pretrained(BertForSequenceClassification, str(out / "best"), key="output_dir/best")
    best = use_float32_head(best).to(accelerator.device)  # scores as in training's evaluation
    entries = {}
    tests = {split: submission_entry(task, split) for split in task.test_splits}
    tests.update({other.name: submission_entry(other, "test") for other in predicted_by(task)})
    for split, entry in tests.items():
        if split not in splits:
            continue
        outputs = predict(accelerator, best, splits[split], collator, recipe.train.per_device_eval_batch_size)
        values = outputs.tolist() if task.is_regression else outputs.argmax(-1).tolist()
        entries[entry] = {"idx": list(splits[f"raw/{split}"]["idx"]), "prediction": values}
    path = out / TEST_PREDICTIONS
    if accelerator.is_main_process:
        write_json(path, entries)
        write_submission({name: (e["idx"], e["prediction"]) for name, e in entries.items()}, out / "predictions")
    accelerator.wait_for_everyone()
    return path


def has_test_predictions(out: Path) -> bool:
    """Whether run folder ``out`` holds its test predictions: ``test_predictions.json`` and,
    under ``predictions/``, the leaderboard TSV of each of its entries and ``submission.zip``
    (not empty)."""
    try:
        entries = json.loads((out / TEST_PREDICTIONS).read_text())
        files = []
        for name in entries:
            task, split = leaderboard_entry(name)
            files.append(task.leaderboard_files[split])
    except (OSError, ValueError, TypeError, KeyError, UserError):  # unreadable: predicted again
        return False
    paths = [out / "predictions" / name for name in [*files, "submission.zip"]]
    return bool(files) and all(path.is_file() and path.stat().st_size > 0 for path in paths)  # an emptied file: again


def predict_export(recipe: FinetuneRecipe, out: Path) -> Path:
    """Predict the test split(s) with the export ``out/best`` of a finished run (the sweep's
    chosen cell and seed), outside its training: writes ``out/test_predictions.json`` and
    ``out/predictions`` as :func:`predict_test` does. Returns the JSON path.

    Raises:
        UserError / DataError: no export in ``out/best``, missing test data.
    """
    from transformers import DataCollatorWithPadding

    from ..tokenizer import recipe_tokenizer
    from ..training.accelerator import make_accelerator
    from .batching import load_splits
    from .tasks import get_task

    recipe = recipe.model_copy(update={"predict_test": True})
    task = get_task(recipe.task)
    accelerator = make_accelerator(recipe)
    tokenizer = recipe_tokenizer(recipe)
    splits = load_splits(recipe, task, tokenizer)
    collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of, return_tensors="pt")
    return predict_test(accelerator, recipe, task, splits, collator, Path(out))

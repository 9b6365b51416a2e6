"""The pretraining job the training loop runs: MLM + NSP windows, metrics, held-out evaluation.

:class:`PretrainJob` is what :func:`bert_recipes.training.loop.train` needs for
pretraining (see :class:`~bert_recipes.training.loop.Job`); the A/B benchmark runs the same
class over its pre-drawn batches. The model is a
:class:`~bert_recipes.modeling.BertPreTrainingObjective`, which returns loss SUMS and counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from .data.loader import build_eval_batches
from .modeling import device_count, training_flops_per_token
from .training.accelerator import in_lockstep
from .training.loop import StepSums
from .training.reporting import progress

# The objective's named outputs, summed over an interval or an evaluation.
OBJECTIVE_SUMS = ("mlm_loss_sum", "nsp_loss_sum", "num_masked", "num_sequences", "mlm_correct", "nsp_correct")


class PretrainJob:
    """Pretraining for the loop: the MLM loss normalised over all masked tokens of a window
    (on all ranks), the NSP loss over all its sequences.

    Args:
        recipe: the resolved recipe (``train.gradient_accumulation_steps`` micro-batches a step).
        batches: collated batches on the host (the streaming loader, or a benchmark's).
        device: where the model runs.
        total_steps: the last optimizer step.
        config: the model's ``BertConfig`` (for MFU); peak: peak FLOP/s per device (None: no MFU).
        world: the number of processes.
        evaluator: runs the held-out evaluation (None: no evaluation).
        loader: the object whose ``state_dict()`` is the data position (None: not resumable).
    """

    loss_terms = {"mlm_loss_sum": "num_masked", "nsp_loss_sum": "num_sequences"}

    def __init__(self, recipe, batches: Iterator[dict], device, total_steps: int, config, peak: float | None = None,
                 world: int = 1, evaluator: Callable[[], dict] | None = None, loader=None):
        self.recipe, self.batches, self.device, self.total_steps = recipe, batches, device, total_steps
        self.config, self.peak, self.world, self.evaluator, self.loader = config, peak, world, evaluator, loader
        self.results: dict = {}

    def window(self, step: int) -> list[dict]:
        return [to_device(next(self.batches), self.device) for _ in range(self.recipe.train.gradient_accumulation_steps)]

    def counts(self, batch: dict) -> dict[str, torch.Tensor]:
        return {"num_masked": (batch["labels"] != -100).sum(),
                "num_sequences": device_count(batch["next_sentence_label"].numel(), self.device)}

    def forward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        computed = device_count(batch["attention_mask"].numel(), batch["attention_mask"].device)
        return {**model(**batch), "num_tokens": batch["attention_mask"].sum(), "num_computed_tokens": computed}

    def metrics(self, sums: dict[str, float], elapsed: float, step: int) -> dict:
        return interval_metrics(sums, elapsed, self.config, self.peak, self.world, self.recipe)

    def evaluates_at(self, step: int) -> bool:
        every = self.recipe.train.eval_steps
        return self.evaluator is not None and ((every and step % every == 0) or step == self.total_steps)

    def evaluate(self) -> dict:
        self.results = self.evaluator()
        return self.results

    def after_evaluation(self, record: dict, step: int) -> None:
        pass  # the last evaluation goes into the export

    def data_state(self) -> dict | None:
        return self.loader.state_dict() if self.loader is not None else None


def interval_metrics(sums: dict[str, float], elapsed: float, config, peak: float | None, world: int, recipe) -> dict:
    """Loss, accuracies and throughput over a logging interval of global sums (the keys of
    :data:`OBJECTIVE_SUMS`, ``num_tokens`` and ``num_computed_tokens``); ``packing_efficiency``
    = real tokens / computed tokens (rows x row length: 1 - the padding share); ``mfu`` when
    ``peak`` (FLOP/s per device) is known."""
    masked, sequences, tokens = sums["num_masked"], sums["num_sequences"], sums["num_tokens"]
    mlm_loss, nsp_loss = sums["mlm_loss_sum"] / masked, sums["nsp_loss_sum"] / sequences
    record = {
        "loss": mlm_loss + nsp_loss,
        "mlm_loss": mlm_loss,
        "nsp_loss": nsp_loss,
        "mlm_accuracy": sums["mlm_correct"] / masked,
        "nsp_accuracy": sums["nsp_correct"] / sequences,
        "tokens_per_s": tokens / elapsed,
        "sequences_per_s": sequences / elapsed,
    }
    if sums.get("num_computed_tokens"):
        record["packing_efficiency"] = tokens / sums["num_computed_tokens"]
    if peak:
        fraction = masked / tokens if recipe.model.sparse_mlm_head else 1.0
        flops = training_flops_per_token(config, seq_len=round(tokens / sequences), predictions_per_token=fraction)
        record["mfu"] = flops * tokens / elapsed / (peak * world)
    return record


def eval_batches(recipe, tokenizer, eval_files: list[str], accelerator):
    """This rank's held-out batches (host tensors) and their count.

    The same ``data.max_eval_samples`` instances every time (fixed seed, one single-shard
    pass, no shuffle buffer) and whatever the number of processes (rank r takes every
    world_size-th instance, :func:`~bert_recipes.data.loader.build_eval_batches`), so
    evaluations along a run and across world sizes are comparable; a Hub dataset's
    ``eval_dataset_split`` when set.
    """
    data = recipe.data.model_copy(update={"dataset_split": recipe.data.eval_dataset_split or recipe.data.dataset_split})
    batches = build_eval_batches(
        data, tokenizer, eval_files, batch_size=recipe.train.per_device_eval_batch_size, seed=recipe.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes, max_samples=recipe.data.max_eval_samples,
    )
    return batches, len(batches)


@torch.no_grad()
def evaluate(accelerator, objective, batches, total: int | None, tokenizer) -> dict:
    """MLM accuracy, NSP accuracy, losses and perplexity over ``batches`` on every rank.

    Runs on the unwrapped model, so ranks with different batch counts never wait on each
    other (with sharded weights they run in lockstep, see ``in_lockstep``). Sums stay on the
    device; one reduction and one host read at the end. Returns {} when nothing was masked.
    """
    model = accelerator.unwrap_model(objective)
    model.eval()
    sums = StepSums(OBJECTIVE_SUMS, torch.zeros(len(OBJECTIVE_SUMS), dtype=torch.float64, device=accelerator.device))
    spare = None  # a rank out of batches while others go on (sharded weights) re-runs one of its own
    bar = progress(batches, total=total, desc="eval", main=accelerator.is_main_process, leave=False)
    for batch, real in in_lockstep(accelerator, bar, lambda: spare if spare is not None else placeholder_batch(tokenizer)):
        out = model(**to_device(batch, accelerator.device))
        if real:
            spare = batch
            sums = sums + StepSums.of({name: out[name] for name in OBJECTIVE_SUMS})
    model.train()
    total_sums = sums.host(accelerator)
    masked, sequences = total_sums["num_masked"], total_sums["num_sequences"]
    if not masked:
        return {}
    mlm_loss = total_sums["mlm_loss_sum"] / masked
    return {
        "eval_mlm_loss": mlm_loss,
        "eval_nsp_loss": total_sums["nsp_loss_sum"] / sequences,
        "eval_mlm_accuracy": total_sums["mlm_correct"] / masked,
        "eval_nsp_accuracy": total_sums["nsp_correct"] / sequences,
        "eval_perplexity": math.exp(min(mlm_loss, 50.0)),
        "eval_sequences": int(sequences),
    }


def placeholder_batch(tokenizer) -> dict:
    """A one-sequence batch ``[CLS] [MASK] [SEP]`` (shapes [1, 3]; NSP label [1]) for a
    forward pass whose outputs are discarded (see :func:`~bert_recipes.training.accelerator.in_lockstep`)."""
    input_ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.mask_token_id, tokenizer.sep_token_id]])
    return {
        "input_ids": input_ids,
        "token_type_ids": torch.zeros_like(input_ids),
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.tensor([[-100, tokenizer.sep_token_id, -100]]),
        "next_sentence_label": torch.tensor([0]),
    }


def to_device(batch: dict, device) -> dict:
    """Every tensor of ``batch`` on ``device`` (non-blocking copies from pinned memory)."""
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

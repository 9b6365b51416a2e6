"""BERT pretraining (masked LM + next-sentence prediction), top to bottom.

``pretrain(recipe)``: tokenizer -> model -> optimizer -> streaming data -> loop -> export.
Each optimizer step consumes ``gradient_accumulation_steps`` micro-batches (derived from
``train.global_batch_size`` and the number of processes when that is set); the MLM loss
is normalised over ALL masked tokens of the window on all ranks (and the NSP loss over all
sequences), so accumulation and data parallelism compute what one large batch would.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from pathlib import Path

import torch

from .data.loader import build_eval_batches, build_pretraining_dataloader
from .errors import UserError
from .export import export_pretrained
from .hub import local_or_hub
from .modeling import BertPreTrainingObjective, build_pretraining_model, training_flops_per_token
from .recipe import PretrainRecipe, expand_files, save_recipe
from .tokenizer import load_tokenizer, save_tokenizer, train_wordpiece
from .training.checkpoint import TrainerState, find_resume_checkpoint, load_checkpoint, save_checkpoint
from .training.loop import (
    StopRequest, in_lockstep, make_accelerator, optimizer_step, prepare_output_dir, sharded_parameters,
)
from .training.optim import build_optimizer, build_scheduler
from .training.reporting import Reporter, interactive, progress
from .training.throughput import peak_flops_per_second

logger = logging.getLogger("bert_recipes")

# Sums reduced across ranks after every step, in this order.
STEP_SUMS = ("mlm_loss_sum", "nsp_loss_sum", "mlm_correct", "nsp_correct", "num_masked", "num_sequences", "num_tokens", "stop")


def pretrain(recipe: PretrainRecipe) -> Path | None:
    """Run a pretraining recipe; return the export folder (None when stopped by a signal).

    Raises:
        UserError: bad files, an occupied output_dir, an unloadable checkpoint, ...
    """
    for key, source in (("model.name_or_path", recipe.model.name_or_path), ("tokenizer.name_or_path", recipe.tokenizer.name_or_path)):
        if source:
            local_or_hub(source, key)  # a missing folder fails before anything is written
    accelerator = make_accelerator(recipe)
    recipe = resolve_batch_size(recipe, accelerator.num_processes, log=accelerator.is_main_process)
    from accelerate.utils import set_seed

    set_seed(recipe.seed)
    out = prepare_output_dir(recipe, accelerator)
    resume = find_resume_checkpoint(recipe.resume_from, out / "checkpoints") if recipe.resume_from else None
    train_files = expand_files(recipe.data.train_files, "data.train_files")
    eval_files = expand_files(recipe.data.eval_files, "data.eval_files")
    has_eval = bool(eval_files) or bool(recipe.data.dataset_name and recipe.data.eval_dataset_split)
    tokenizer = prepare_tokenizer(recipe, out, accelerator, train_files)
    if accelerator.is_main_process:
        save_recipe(recipe, out)

    model = build_pretraining_model(recipe, tokenizer)
    objective = BertPreTrainingObjective(model, sparse_mlm_head=recipe.model.sparse_mlm_head)
    if recipe.train.torch_compile:
        objective.compile(dynamic=True)
    train = recipe.train
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, train.max_steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    if accelerator.distributed_type == "DEEPSPEED" and train.gradient_accumulation_steps > 1:
        raise UserError("train.gradient_accumulation_steps: DeepSpeed steps inside backward; use 1 with DeepSpeed "
                        "(raise per_device_train_batch_size or the number of processes instead)")
    loader = build_pretraining_dataloader(
        recipe.data, tokenizer, train_files, batch_size=train.per_device_train_batch_size, seed=recipe.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes,
    )
    state = TrainerState()
    if resume is not None:
        state, data_state = load_checkpoint(accelerator, resume)
        scheduler.load_state_dict(state.extra["scheduler"])
        if data_state is not None:
            loader.load_state_dict(data_state)
        logger.info("resumed from %s at step %d", resume, state.step)

    reporter = Reporter(accelerator, out, train.max_steps, initial_step=state.step, desc="pretrain")
    peak = peak_flops_per_second(accelerator.device, train.peak_flops)
    batches = iter(loader)
    interval = torch.zeros(len(STEP_SUMS), dtype=torch.float64)
    interval_start = time.perf_counter()
    with StopRequest() as stop:
        while state.step < train.max_steps:
            window = [_to_device(next(batches), accelerator.device) for _ in range(train.gradient_accumulation_steps)]
            sums = forward_backward(accelerator, objective, window)
            sums[STEP_SUMS.index("stop")] = float(stop.requested is not None)
            sums = accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu().double()
            step_loss = float(sums[0] / sums[4] + sums[1] / sums[5])
            grad_norm = optimizer_step(
                accelerator, objective, optimizer, scheduler, step_loss, train.max_grad_norm, state, train.max_consecutive_nonfinite_steps
            )
            state.step += 1
            state.tokens_seen += int(sums[6])
            interval += sums
            reporter.advance(1, loss=step_loss)

            if state.step % train.logging_steps == 0 or state.step == train.max_steps:
                elapsed = time.perf_counter() - interval_start
                record = interval_metrics(interval, elapsed, model.config, peak, accelerator.num_processes, recipe)
                record.update(lr=scheduler.get_last_lr()[0], grad_norm=grad_norm, skipped_steps=state.skipped_steps)
                reporter.log(record, state.step)
                interval.zero_()
                interval_start = time.perf_counter()
            if has_eval and train.eval_steps and state.step % train.eval_steps == 0 and state.step < train.max_steps:
                reporter.log(evaluate(accelerator, objective, recipe, tokenizer, eval_files), state.step)
            stopping = bool(sums[STEP_SUMS.index("stop")] > 0)
            if stopping or (train.save_steps and state.step % train.save_steps == 0):
                state.extra["scheduler"] = scheduler.state_dict()
                path = save_checkpoint(
                    accelerator, objective, out / "checkpoints", state, recipe, loader.state_dict(), train.save_total_limit
                )
                if stopping:
                    reporter.close()
                    reporter.write(f"stopped by {stop.requested or 'a signal'} at step {state.step}; checkpoint {path}; "
                                   "resume with resume_from=latest")
                    accelerator.end_training()
                    return None

    verify_replicas_in_sync(accelerator, model)
    results = evaluate(accelerator, objective, recipe, tokenizer, eval_files) if has_eval else {}
    if results:
        reporter.log(results, state.step)
    reporter.close()
    final = out / "final"
    full_state = accelerator.get_state_dict(objective)  # every rank: gathers FSDP/DeepSpeed shards
    if accelerator.is_main_process:
        weights = {key.removeprefix("model."): value for key, value in full_state.items()}
        export_pretrained(accelerator.unwrap_model(objective).model, tokenizer, recipe, final, results, state.step, weights)
    accelerator.wait_for_everyone()
    reporter.write(reporter.summary({"steps": state.step, "skipped_steps": state.skipped_steps, "export": str(final)}))
    accelerator.end_training()
    return final


def resolve_batch_size(recipe: PretrainRecipe, world_size: int, log: bool = True) -> PretrainRecipe:
    """The recipe with ``train.gradient_accumulation_steps`` derived from ``train.global_batch_size``
    (when set) for ``world_size`` processes; logs the effective optimizer batch.

    Raises:
        RecipeError: ``global_batch_size`` is not divisible by the per-step batch.
    """
    train = recipe.train
    accumulation = train.accumulation_for(world_size)
    if accumulation != train.gradient_accumulation_steps:
        recipe = recipe.model_copy(update={"train": train.model_copy(update={"gradient_accumulation_steps": accumulation})})
    if log:
        logger.info("effective batch: %d sequences per optimizer step = %d per device x %d process(es) x %d accumulation step(s)",
                    train.per_device_train_batch_size * world_size * accumulation, train.per_device_train_batch_size,
                    world_size, accumulation)
    return recipe


def prepare_tokenizer(recipe: PretrainRecipe, out: Path, accelerator, train_files: list[str]):
    """The run's tokenizer, saved in ``output_dir/tokenizer`` by the main process.

    Priority: the run's own saved tokenizer (resume), ``tokenizer.name_or_path``, the
    checkpoint's tokenizer (``model.name_or_path``), else a WordPiece vocabulary trained on
    ``tokenizer.train_files`` (default ``data.train_files``).
    """
    saved = out / "tokenizer"
    if accelerator.is_main_process and not (recipe.resume_from and saved.is_dir()):
        spec = recipe.tokenizer
        if spec.name_or_path:
            tokenizer = load_tokenizer(spec.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
        elif recipe.model.name_or_path:
            tokenizer = load_tokenizer(recipe.model.name_or_path, key="model.name_or_path",
                                       trust_remote_code=recipe.model.trust_remote_code)
        else:
            files = expand_files(spec.train_files, "tokenizer.train_files") if spec.train_files else train_files
            if not files:
                raise UserError("tokenizer.train_files: needed to train a vocabulary when data comes from data.dataset_name")
            logger.info("training a WordPiece vocabulary of %d on %d file(s)", spec.vocab_size, len(files))
            tokenizer = train_wordpiece(files, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                                        lowercase=spec.lowercase, show_progress=interactive())
        save_tokenizer(tokenizer, saved)
    accelerator.wait_for_everyone()
    return load_tokenizer(str(saved), key="output_dir/tokenizer")


def forward_backward(accelerator, objective, window: list[dict]) -> torch.Tensor:
    """Forward and backward over one accumulation window; return this rank's STEP_SUMS.

    The loss of micro-batch k is ``world * (mlm_sum_k / M + nsp_sum_k / S)`` with M, S the
    masked-token and sequence counts of the whole window on all ranks; DDP's gradient mean
    over ``world`` ranks then yields the gradient of the global mean loss. Gradients are
    synchronised only on the last micro-batch.
    """
    world = accelerator.num_processes
    counts = torch.tensor(
        [sum(int((b["labels"] != -100).sum()) for b in window), sum(b["next_sentence_label"].numel() for b in window)],
        dtype=torch.float64, device=accelerator.device,
    )
    num_masked, num_sequences = accelerator.reduce(counts, reduction="sum").tolist()
    sums = torch.zeros(len(STEP_SUMS), dtype=torch.float64)
    for k, batch in enumerate(window):
        sync = k == len(window) - 1
        with (contextlib.nullcontext() if sync else accelerator.no_sync(objective)):
            out = objective(**batch)
            loss = world * (out["mlm_loss_sum"] / num_masked + out["nsp_loss_sum"] / num_sequences)
            accelerator.backward(loss)
        for i, name in enumerate(STEP_SUMS[:6]):
            sums[i] += float(out[name].detach())
        sums[6] += float(batch["attention_mask"].sum())
    return sums


def verify_replicas_in_sync(accelerator, model) -> None:
    """With several processes (data parallel), check that every rank holds the same parameters.

    Raises:
        RuntimeError: the replicas diverged (a bug, never a user error).
    """
    if accelerator.num_processes == 1 or sharded_parameters(accelerator):
        return  # FSDP/DeepSpeed: each rank holds its own shard, there are no replicas to compare
    with torch.no_grad():
        local = torch.stack([p.detach().double().sum() for p in model.parameters()]).to(accelerator.device)
    gathered = accelerator.gather(local.unsqueeze(0))
    if not bool((gathered == gathered[0]).all()):
        raise RuntimeError("model replicas diverged across ranks")
    if accelerator.is_main_process:
        logger.info("parameters identical on all %d ranks", accelerator.num_processes)


def interval_metrics(sums: torch.Tensor, elapsed: float, config, peak: float | None, world: int, recipe) -> dict:
    """Loss, accuracies and throughput over a logging interval of global sums."""
    mlm_loss_sum, nsp_loss_sum, mlm_correct, nsp_correct, masked, sequences, tokens, _ = sums.tolist()
    mlm_loss, nsp_loss = mlm_loss_sum / masked, nsp_loss_sum / sequences
    record = {
        "loss": mlm_loss + nsp_loss,
        "mlm_loss": mlm_loss,
        "nsp_loss": nsp_loss,
        "mlm_accuracy": mlm_correct / masked,
        "nsp_accuracy": nsp_correct / sequences,
        "tokens_per_s": tokens / elapsed,
        "sequences_per_s": sequences / elapsed,
    }
    if peak:
        fraction = masked / tokens if recipe.model.sparse_mlm_head else 1.0
        flops = training_flops_per_token(config, seq_len=round(tokens / sequences), predictions_per_token=fraction)
        record["mfu"] = flops * tokens / elapsed / (peak * world)
    return record


@torch.no_grad()
def evaluate(accelerator, objective, recipe: PretrainRecipe, tokenizer, eval_files: list[str]) -> dict:
    """MLM accuracy, NSP accuracy, losses and perplexity on the held-out files.

    The same ``data.max_eval_samples`` instances are built every time (fixed seed) and
    whatever the number of processes (each rank takes every world_size-th), so evaluations
    along a run and across world sizes are comparable. Runs on the unwrapped model,
    so ranks with different batch counts never wait on each other.
    """
    # the same held-out instances whatever the number of processes; a Hub dataset's eval split
    data = recipe.data.model_copy(update={"dataset_split": recipe.data.eval_dataset_split or recipe.data.dataset_split})
    loader = build_eval_batches(
        data, tokenizer, eval_files, batch_size=recipe.train.per_device_eval_batch_size, seed=recipe.seed,
        rank=accelerator.process_index, world_size=accelerator.num_processes, max_samples=recipe.data.max_eval_samples,
    )
    model = accelerator.unwrap_model(objective)
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64)
    batches = len(loader)
    spare = None  # a rank out of batches while others go on (sharded weights) re-runs one of its own
    bar = progress(loader, total=batches, desc="eval", main=accelerator.is_main_process, leave=False)
    for batch, real in in_lockstep(accelerator, bar, lambda: spare if spare is not None else placeholder_batch(tokenizer)):
        out = model(**_to_device(batch, accelerator.device))
        if real:
            spare = batch
            sums += torch.tensor([float(out[name]) for name in STEP_SUMS[:6]], dtype=torch.float64)
    model.train()
    mlm_loss_sum, nsp_loss_sum, mlm_correct, nsp_correct, masked, sequences = (
        accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu().tolist()
    )
    if not masked:
        return {}
    mlm_loss = mlm_loss_sum / masked
    return {
        "eval_mlm_loss": mlm_loss,
        "eval_nsp_loss": nsp_loss_sum / sequences,
        "eval_mlm_accuracy": mlm_correct / masked,
        "eval_nsp_accuracy": nsp_correct / sequences,
        "eval_perplexity": math.exp(min(mlm_loss, 50.0)),
        "eval_sequences": int(sequences),
    }


def placeholder_batch(tokenizer) -> dict:
    """A one-sequence batch ``[CLS] [MASK] [SEP]`` (shapes [1, 3]; NSP label [1]) for a
    forward pass whose outputs are discarded (see :func:`~bert_recipes.training.loop.in_lockstep`)."""
    input_ids = torch.tensor([[tokenizer.cls_token_id, tokenizer.mask_token_id, tokenizer.sep_token_id]])
    return {
        "input_ids": input_ids,
        "token_type_ids": torch.zeros_like(input_ids),
        "attention_mask": torch.ones_like(input_ids),
        "labels": torch.tensor([[-100, tokenizer.sep_token_id, -100]]),
        "next_sentence_label": torch.tensor([0]),
    }


def _to_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}

"""The training loop: the one loop pretraining, fine-tuning and the A/B benchmarks run.

:func:`train` drives a :class:`Job` (what is trained on and how it is scored) through a
:class:`Run` (the model, optimizer, scheduler and bookkeeping a command built). Each
optimizer step consumes the job's window of micro-batches; every loss is a SUM normalised
by a count over the whole window on all ranks (``Job.loss_terms``), so accumulation and
data parallelism compute what one large batch would.

Host syncs. The hot path keeps every number on the device: per optimizer step there is one
all-reduce (the window's counts and the stop requests) and ONE device-to-host read, of
``[grad norm, this rank's loss, stop requests]``, because skipping a non-finite step and
stopping on a signal are decisions the host makes. The named sums of a logging interval
(:class:`StepSums`) stay on the device until a logging step reduces and reads them once.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from ..errors import TrainingError
from .accelerator import sharded_parameters
from .checkpoint import TrainerState, save_checkpoint
from .signals import RunStopped, StopRequest

logger = logging.getLogger("bert_recipes")


class Job(Protocol):
    """What :func:`train` needs from a command; the model itself stays a plain module.

    ``loss_terms`` maps each loss SUM returned by :meth:`forward` to the count (from
    :meth:`counts`) that normalises it: ``{"mlm_loss_sum": "num_masked", ...}``.
    """

    total_steps: int
    loss_terms: dict[str, str]

    def window(self, step: int) -> list[dict]:
        """This rank's micro-batches (on the device) for 0-based optimizer step ``step``."""

    def counts(self, batch: dict) -> dict[str, torch.Tensor]:
        """The normalising counts of a micro-batch, known before its forward (0-d tensors)."""

    def forward(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Named loss sums and counts of a micro-batch (0-d tensors, the loss sums with grad)."""

    def metrics(self, sums: dict[str, float], elapsed: float, step: int) -> dict:
        """The logging record of an interval of global sums that took ``elapsed`` seconds."""

    def evaluates_at(self, step: int) -> bool:
        """Whether to evaluate after optimizer step ``step`` (1-based)."""

    def evaluate(self) -> dict:
        """An evaluation's record for metrics.jsonl (every rank calls it)."""

    def after_evaluation(self, record: dict, step: int) -> None:
        """What to do with an evaluation (keep the best export, ...)."""

    def data_state(self) -> dict | None:
        """This rank's data position for a checkpoint (None: the window is a function of the step)."""


@dataclass
class Run:
    """What a command built for :func:`train`. ``model`` is the prepared (wrapped) module."""

    accelerator: object
    model: torch.nn.Module
    optimizer: object
    scheduler: object
    recipe: object
    out: Path
    state: TrainerState
    reporter: object


class StepSums:
    """Named sums (float64, one vector on the device) of a step or a logging interval."""

    def __init__(self, names: tuple[str, ...], values: torch.Tensor):
        self.names, self.values = names, values

    @classmethod
    def of(cls, named: dict[str, torch.Tensor]) -> "StepSums":
        return cls(tuple(named), torch.stack([value.detach().double() for value in named.values()]))

    def __add__(self, other: "StepSums | None") -> "StepSums":
        return self if other is None else StepSums(self.names, self.values + other.values)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.values[self.names.index(name)]

    def host(self, accelerator) -> dict[str, float]:
        """Summed over all ranks and read on the host: one all-reduce and one device-to-host read."""
        return dict(zip(self.names, accelerator.reduce(self.values, reduction="sum").tolist()))


def train(job: Job, run: Run, checkpoint_at_end: bool = True) -> None:
    """Train ``run.model`` on ``job`` from ``run.state.step`` to ``job.total_steps``.

    Logs every ``train.logging_steps`` (and the last step), evaluates where the job says,
    saves a checkpoint every ``train.save_steps``, on SIGTERM/SIGINT and at the last step
    (so a finished run can always be extended with ``resume_from=latest``; the benchmarks,
    which call it chunk by chunk, pass ``checkpoint_at_end=False``).

    Raises:
        RunStopped: a signal stopped the run after its checkpoint was saved.
        TrainingError: too many consecutive non-finite steps.
    """
    accelerator, state, config = run.accelerator, run.state, run.recipe.train
    interval, started = None, time.perf_counter()
    saved_at = state.step if state.step else None  # a resumed run starts at its checkpoint
    run.model.train()
    with StopRequest() as stop:
        while state.step < job.total_steps:
            sums, loss, stops = forward_backward(accelerator, run.model, job, job.window(state.step), stop.requested)
            grad_norm, stopping = optimizer_step(run, loss, stops)
            state.step += 1
            interval = sums + interval
            run.reporter.advance(1)
            if state.step % config.logging_steps == 0 or state.step == job.total_steps:
                record = job.metrics(interval.host(accelerator), time.perf_counter() - started, state.step)
                record.update(lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm, skipped_steps=state.skipped_steps)
                run.reporter.log(record, state.step)
                interval, started = None, time.perf_counter()
            if job.evaluates_at(state.step):
                record = job.evaluate()
                run.reporter.log(record, state.step)
                job.after_evaluation(record, state.step)
            if stopping or (config.save_steps and state.step % config.save_steps == 0):
                path = save_checkpoint(accelerator, run.model, run.scheduler, run.out / "checkpoints", state,
                                       run.recipe, job.data_state(), config.save_total_limit)
                saved_at = state.step
                if stopping:
                    stopped = RunStopped(stop.requested or "a signal", state.step, path)
                    run.reporter.close(), run.reporter.write(str(stopped)), accelerator.end_training()
                    raise stopped
    if checkpoint_at_end and saved_at != state.step:  # the end of a run is always resumable
        save_checkpoint(accelerator, run.model, run.scheduler, run.out / "checkpoints", state, run.recipe,
                        job.data_state(), config.save_total_limit)
    verify_replicas_in_sync(accelerator, run.model)


def forward_backward(accelerator, model, job: Job, window: list[dict], stop_requested=None):
    """Forward and backward over one accumulation window.

    The loss of micro-batch k is ``world * sum_t(sum_t_k / count_t)`` with count_t the
    count of the whole window on all ranks; DDP's gradient mean over ``world`` ranks then
    gives the gradient of the global mean loss. Gradients are synchronised only on the last
    micro-batch. No host reads: the counts are reduced (with the ranks' stop requests) on
    the device.

    Returns:
        ``(sums, loss, stops)``: this rank's :class:`StepSums` of the window, this rank's
        share of the step loss (0-d; the ranks' shares add up to the step loss) and the
        number of ranks asking to stop (0-d), all on the device.
    """
    counts = [job.counts(batch) for batch in window]
    names = tuple(counts[0])
    local = [sum(c[name] for c in counts) for name in names]
    flag = torch.tensor(float(stop_requested is not None), device=accelerator.device)
    reduced = accelerator.reduce(torch.stack([torch.as_tensor(v, device=accelerator.device).double() for v in local]
                                             + [flag.double()]), reduction="sum")
    total = dict(zip(names, reduced[:-1]))
    world, sums = accelerator.num_processes, None
    for k, batch in enumerate(window):
        with contextlib.nullcontext() if k == len(window) - 1 else accelerator.no_sync(model):
            out = job.forward(model, batch)
            accelerator.backward(world * sum(out[term] / total[count] for term, count in job.loss_terms.items()))
        sums = StepSums.of(out) + sums
    loss = sum(sums[term] / total[count] for term, count in job.loss_terms.items())
    return sums, loss, reduced[-1]


def optimizer_step(run: Run, loss: torch.Tensor, stops: torch.Tensor) -> tuple[float, bool]:
    """Clip gradients and take one optimizer step unless the loss or gradients are not finite.

    A non-finite step is skipped (gradients dropped, weights untouched) and counted in
    ``state.skipped_steps`` / ``state.consecutive_nonfinite``; with fp16, overflowing
    gradients are left to the gradient scaler, which skips the step and lowers its scale.
    The scheduler advances either way, so the learning rate follows the step counter. A NaN
    on any rank reaches every rank through the gradient all-reduce, so ranks agree.

    Returns:
        ``(grad_norm, stopping)``: the global gradient norm before clipping and whether a
        rank asked to stop, from the step's one device-to-host read.

    Raises:
        TrainingError: more than ``train.max_consecutive_nonfinite_steps`` in a row.
    """
    accelerator, state, config = run.accelerator, run.state, run.recipe.train
    limit = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    norm = _scalar(accelerator.clip_grad_norm_(run.model.parameters(), limit), loss.device)
    grad_norm, loss_value, stopping = torch.stack([norm, loss.double(), stops.double()]).tolist()  # the host read
    fp16 = accelerator.mixed_precision == "fp16"
    if math.isfinite(loss_value) and (math.isfinite(grad_norm) or fp16):
        run.optimizer.step()
        state.consecutive_nonfinite = 0
    else:
        if accelerator.scaler is not None:
            accelerator.scaler.update()  # clip_grad_norm_ unscaled the gradients of this skipped step
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
        logger.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", state.step + 1, state.consecutive_nonfinite)
        if state.consecutive_nonfinite > config.max_consecutive_nonfinite_steps:
            raise TrainingError(
                f"train.max_consecutive_nonfinite_steps: {state.consecutive_nonfinite} consecutive steps had a "
                "non-finite loss or gradient; lower train.learning_rate or check the data. The last checkpoint is intact."
            )
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return (grad_norm if math.isfinite(loss_value) else float("nan")), stopping > 0


def _scalar(value, device) -> torch.Tensor:
    """A gradient norm as a 0-d float64 tensor on ``device`` (FSDP2 gives a DTensor,
    DeepSpeed a float or None)."""
    if value is None:
        return torch.tensor(float("nan"), dtype=torch.float64, device=device)
    if not isinstance(value, torch.Tensor):
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return value.detach().double().reshape(()).to(device)


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

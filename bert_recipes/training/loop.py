"""The training loop: the one loop pretraining, fine-tuning and the A/B benchmarks run.

:func:`train` drives a :class:`Job` (what is trained on and how it is scored) through a
:class:`Run` (the model, optimizer, scheduler and bookkeeping a command built). Each
optimizer step consumes the job's window of micro-batches; every loss is a SUM normalised
by a count over the whole window on all ranks (``Job.loss_terms``), so accumulation and
data parallelism compute what one large batch would.

Host syncs. The hot path keeps every number on the device: per optimizer step there is one
all-reduce (the window's counts) and no device-to-host read. A non-finite step is skipped
on the device (fused AdamW's ``found_inf``, :func:`optimizer_step`), its count and the
gradient norm wait in :class:`StepHealth`, the named sums of a logging interval in
:class:`StepSums`, until a logging, evaluation or save step reads them once. A signal's
stop request is a host flag, agreed between ranks on the host (:func:`any_rank_stopping`).
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
from .accelerator import finish_trackers, sharded_parameters
from .checkpoint import TrainerState, checkpoint_path, save_checkpoint
from .precision import record_precision
from .signals import RunStopped, StopRequest, any_rank_stopping

logger = logging.getLogger("bert_recipes")

#: Fold the gradient clip into fused Adam/AdamW's ``grad_scale`` where :func:`optimizer_step`
#: can (see :func:`clip_divisor`); False clips with ``clip_grad_norm_`` as before (the
#: benchmarks' ``--today`` runs, which measure the code before this change).
FOLD_CLIP = True


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


class StepHealth:
    """Non-finite steps, counted on the device and read by the host only at read points.

    ``values`` is ``[grad norm of the last step, skipped steps, non-finite steps in a row, the
    longest such run since the last read]`` (float64, on the device). :meth:`record` updates
    it without a host read and returns the step's ``found_inf`` (1.0: skip it); :meth:`read`
    brings it to the host at a logging, evaluation or save step, updates the
    :class:`TrainerState` and enforces ``train.max_consecutive_nonfinite_steps``.
    """

    def __init__(self, state: TrainerState, device, limit: int):
        self.state, self.limit, self.read_at = state, limit, state.step
        self.values = torch.tensor([math.nan, state.skipped_steps, state.consecutive_nonfinite,
                                    state.consecutive_nonfinite], dtype=torch.float64, device=device)

    def record(self, norm: torch.Tensor, loss: torch.Tensor, norm_counts: bool = True) -> torch.Tensor:
        """Count a step with gradient norm ``norm`` and loss ``loss`` (0-d, on the device);
        with ``norm_counts=False`` (fp16: the gradient scaler handles overflow) only the loss does."""
        finite_loss = torch.isfinite(loss)
        bad = ~(finite_loss & torch.isfinite(norm)) if norm_counts else ~finite_loss
        bad = bad.double()
        grad_norm = torch.where(finite_loss, norm.double(), math.nan)
        in_a_row = (self.values[2] + 1) * bad
        self.values = torch.stack([grad_norm, self.values[1] + bad, in_a_row, torch.maximum(self.values[3], in_a_row)])
        return bad.float()

    def read(self, step: int) -> float:
        """The gradient norm of step ``step`` (1-based; NaN after a non-finite loss), read on the host.

        Raises:
            TrainingError: more than ``train.max_consecutive_nonfinite_steps`` in a row.
        """
        grad_norm, skipped, in_a_row, longest = self.values.tolist()  # the host read
        state, new = self.state, int(skipped) - self.state.skipped_steps
        state.skipped_steps, state.consecutive_nonfinite = int(skipped), int(in_a_row)
        if new:
            logger.warning("steps %d-%d: %d step(s) with a non-finite loss or gradient skipped (at most %d in a "
                           "row, %d now)", self.read_at + 1, step, new, longest, in_a_row)
        self.read_at = step
        self.values[3] = self.values[2]  # the next interval's longest run starts from the current one
        if longest > self.limit:  # a run that ended before this read counts too
            raise TrainingError(
                f"train.max_consecutive_nonfinite_steps: {int(longest)} consecutive steps had a "
                "non-finite loss or gradient; lower train.learning_rate or check the data. The last checkpoint is intact."
            )
        return grad_norm


def train(job: Job, run: Run, checkpoint_at_end: bool = True) -> None:
    """Train ``run.model`` on ``job`` from ``run.state.step`` to ``job.total_steps``.

    Logs every ``train.logging_steps`` (and the last step), evaluates where the job says,
    saves a checkpoint every ``train.save_steps``, on SIGTERM/SIGINT and at the last step
    (so a finished run can always be extended with ``resume_from=latest``; the benchmarks,
    which call it chunk by chunk, pass ``checkpoint_at_end=False``); a signal during that
    last save waits for it, then stops the run. Only those steps read
    device values on the host (:class:`StepHealth`, :class:`StepSums`).

    Raises:
        RunStopped: a signal stopped the run after its checkpoint was saved.
        TrainingError: too many consecutive non-finite steps (seen at the next read point).
    """
    accelerator, state, config = run.accelerator, run.state, run.recipe.train
    interval, started = None, time.perf_counter()
    saved_at = state.step if state.step else None  # a resumed run starts at its checkpoint
    health = StepHealth(state, accelerator.device, config.max_consecutive_nonfinite_steps)
    on_device = accelerator.mixed_precision != "fp16" and skips_on_device(run.optimizer, run.model)
    record_precision(state.extra, state.step, accelerator.mixed_precision)  # for the model card
    run.model.train()
    with StopRequest() as stop:
        while state.step < job.total_steps:
            window = job.window(state.step)
            requested = stop.requested is not None  # once the step has its data; agreed between ranks after it
            sums, loss = forward_backward(accelerator, run.model, job, window)
            optimizer_step(run, loss, health, on_device)
            state.step += 1
            interval = sums + interval
            run.reporter.advance(1)
            stopping = any_rank_stopping(accelerator, requested)
            logs = state.step % config.logging_steps == 0 or state.step == job.total_steps
            evaluates = job.evaluates_at(state.step)
            saves = stopping or (config.save_steps and state.step % config.save_steps == 0)
            if logs or evaluates or saves:
                grad_norm = health.read(state.step)  # raises after too many non-finite steps, before anything is saved
            if logs:
                record = job.metrics(interval.host(accelerator), time.perf_counter() - started, state.step)
                record.update(lr=run.scheduler.get_last_lr()[0], grad_norm=grad_norm, skipped_steps=state.skipped_steps)
                run.reporter.log(record, state.step)
                interval, started = None, time.perf_counter()
            if evaluates:
                record = job.evaluate()
                run.reporter.log(record, state.step)
                job.after_evaluation(record, state.step)
            if saves:
                path = save_checkpoint(accelerator, run.model, run.scheduler, run.out / "checkpoints", state,
                                       run.recipe, job.data_state(), config.save_total_limit)
                saved_at = state.step
                if stopping:
                    _stop(run, stop, path)
        if checkpoint_at_end:  # the end of a run is always resumable; a signal waits for its save
            path = checkpoint_path(run.out / "checkpoints", state.step)  # saved at a save step, or now:
            if saved_at != state.step:
                path = save_checkpoint(accelerator, run.model, run.scheduler, run.out / "checkpoints", state, run.recipe,
                                       job.data_state(), config.save_total_limit)
            if any_rank_stopping(accelerator, stop.requested is not None):  # it killed that save half-written, or
                _stop(run, stop, path)  # was ignored at the last save step (found by helpers)
    verify_replicas_in_sync(accelerator, run.model)


def _stop(run: Run, stop: StopRequest, checkpoint: Path) -> None:
    """End a run that a signal stopped, its checkpoint saved: close the reporter, say where
    the checkpoint is, and raise :class:`RunStopped`."""
    stopped = RunStopped(stop.requested or "a signal", run.state.step, checkpoint)
    run.reporter.close(), run.reporter.write(str(stopped)), finish_trackers(run.accelerator)
    raise stopped


def forward_backward(accelerator, model, job: Job, window: list[dict]):
    """Forward and backward over one accumulation window.

    The loss of micro-batch k is ``world * sum_t(sum_t_k / count_t)`` with count_t the
    count of the whole window on all ranks; DDP's gradient mean over ``world`` ranks then
    gives the gradient of the global mean loss. Gradients are synchronised only on the last
    micro-batch. No host reads: the counts are reduced on the device.

    Returns:
        ``(sums, loss)``: this rank's :class:`StepSums` of the window and this rank's share
        of the step loss (0-d; the ranks' shares add up to the step loss), on the device.
    """
    counts = [job.counts(batch) for batch in window]
    names = tuple(counts[0])
    local = [sum(c[name] for c in counts) for name in names]
    reduced = accelerator.reduce(torch.stack([torch.as_tensor(v, device=accelerator.device).double() for v in local]),
                                 reduction="sum")
    total = dict(zip(names, reduced))
    world, sums = accelerator.num_processes, None
    for k, batch in enumerate(window):
        with contextlib.nullcontext() if k == len(window) - 1 else accelerator.no_sync(model):
            out = job.forward(model, batch)
            accelerator.backward(world * sum(out[term] / total[count] for term, count in job.loss_terms.items()))
        sums = StepSums.of(out) + sums
    loss = sum(sums[term] / total[count] for term, count in job.loss_terms.items())
    return sums, loss


def optimizer_step(run: Run, loss: torch.Tensor, health: StepHealth, on_device: bool) -> None:
    """Clip gradients and take one optimizer step unless the loss or gradients are not finite.

    A non-finite step is skipped (weights and optimizer state untouched) and counted by
    ``health``. With torch's fused Adam/AdamW the skip is decided on the device: the
    kernel's ``found_inf`` input (the one ``torch.amp.GradScaler`` uses) makes it a no-op,
    so no value is read on the host (``on_device``, from :func:`skips_on_device`). Other
    optimizers (LAMB, DeepSpeed's, sharded FSDP parameters) and fp16 (whose gradient scaler
    skips overflowing steps and lowers its scale) read the step's health on the host, once
    per step. The scheduler advances either way, so the learning rate follows the step
    counter. A NaN on any rank reaches every rank through the gradient all-reduce, so ranks agree.
    With the device-side skip and unsharded parameters, the clip is folded into the same
    kernel (its ``grad_scale`` input, :func:`clip_divisor`) instead of a pass of its own.

    Raises:
        TrainingError: (host-read optimizers) more than ``train.max_consecutive_nonfinite_steps`` in a row.
    """
    accelerator, config = run.accelerator, run.recipe.train
    limit = config.max_grad_norm if config.max_grad_norm > 0 else float("inf")
    folds = FOLD_CLIP and on_device and accelerator.distributed_type not in ("FSDP", "DEEPSPEED", "XLA")
    if folds:  # the clip's scale goes to the fused kernel: no separate pass over the gradients
        norm = torch.nn.utils.get_total_norm([p.grad for p in run.model.parameters() if p.grad is not None])
        grad_scale = clip_divisor(norm, limit)
        norm = _scalar(norm, loss.device)
    else:
        norm = _scalar(accelerator.clip_grad_norm_(run.model.parameters(), limit), loss.device)
    fp16 = accelerator.mixed_precision == "fp16"
    found_inf = health.record(norm, loss, norm_counts=not fp16)
    if on_device:
        inner = getattr(run.optimizer, "optimizer", run.optimizer)
        inner.found_inf, inner.grad_scale = found_inf, grad_scale if folds else None
        try:
            run.optimizer.step()
        finally:
            del inner.found_inf, inner.grad_scale
    else:
        health.read(run.state.step + 1)
        if run.state.consecutive_nonfinite == 0:
            run.optimizer.step()
        elif accelerator.scaler is not None:
            accelerator.scaler.update()  # clip_grad_norm_ unscaled the gradients of this skipped step
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)


def clip_divisor(norm: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What fused Adam/AdamW divides the gradients by (its ``grad_scale`` input) to clip them
    to ``max_norm``: ``max(1, (norm + 1e-6) / max_norm)``, the reciprocal of the factor
    ``torch.nn.utils.clip_grad_norm_`` multiplies them by (same 1e-6, same clamp at 1).
    ``norm``: the 0-d total gradient norm on the device; returns a 0-d float32 tensor there
    (1 for ``max_norm`` inf; NaN or inf for a non-finite norm, whose step ``found_inf`` skips).

    Folding the clip into the optimizer's kernel saves the pass ``clip_grad_norm_`` makes to
    scale every gradient in place (measured on MiniLM-L6's 22.7 M parameters, 1 CPU thread:
    15 ms for clip_grad_norm_, 7 ms for the norm alone). The update differs from
    multiply-then-step by the rounding of ``g / d`` against ``g * (1 / d)`` (at most 1 ulp of
    a gradient) when the step clips, and not at all when it does not (``d`` = 1).
    """
    return torch.clamp((norm.detach().float() + 1e-6) / max_norm, min=1.0)


def skips_on_device(optimizer, model) -> bool:
    """Whether ``optimizer`` (or the one Accelerate wraps) takes ``found_inf`` (torch's fused
    Adam/AdamW) for these plain, unsharded parameters."""
    optimizer = getattr(optimizer, "optimizer", optimizer)
    fused = isinstance(optimizer, torch.optim.Adam) and bool(optimizer.defaults.get("fused"))
    return fused and not any(hasattr(p, "full_tensor") for p in model.parameters())


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

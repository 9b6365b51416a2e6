"""The values a run derives from its recipe and its processes, resolved in one place.

The recipe is immutable once validated; what depends on the launch (the number of
processes) or on the data (steps per epoch) lives in :class:`Resolved`, built by
:func:`resolve` during a command's preflight.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

logger = logging.getLogger("bert_recipes")


@dataclass(frozen=True)
class Resolved:
    """A validated recipe with its derived values.

    Attributes:
        recipe: the recipe with ``train.gradient_accumulation_steps`` resolved (a copy: the
            value derived from ``train.global_batch_size`` when that is set); this is the
            recipe written into the run, its checkpoints and exports.
        world_size: the number of processes.
        accumulation: micro-batches per optimizer step on each process.
    """

    recipe: object
    world_size: int
    accumulation: int

    @property
    def effective_batch(self) -> int:
        """Examples per optimizer step, all processes and micro-batches together."""
        return self.recipe.train.per_device_train_batch_size * self.world_size * self.accumulation

    def total_steps(self, steps_per_epoch: int | None = None) -> int:
        """``train.max_steps`` when set, else ``ceil(num_train_epochs * steps_per_epoch)``."""
        train = self.recipe.train
        return train.max_steps or math.ceil(train.num_train_epochs * steps_per_epoch)


def resolve(recipe, world_size: int, log: bool = True) -> Resolved:
    """Resolve ``recipe`` for ``world_size`` processes; logs the effective optimizer batch.

    Raises:
        RecipeError: ``train.global_batch_size`` is not divisible by the per-step batch.
    """
    train = recipe.train
    accumulation = train.accumulation_for(world_size)
    if accumulation != train.gradient_accumulation_steps:
        recipe = recipe.model_copy(update={"train": train.model_copy(update={"gradient_accumulation_steps": accumulation})})
    resolved = Resolved(recipe, world_size, accumulation)
    if log:
        log_plan(resolved)
    return resolved


_WARNED: set = set()  # (optimizer batch, processes) pairs warned about in this process


def log_plan(resolved: Resolved) -> None:
    """The effective-batch line (commands log it once their preflight has passed, so a user
    error is the only line on stderr)."""
    logger.info("effective batch: %d sequences per optimizer step = %d per device x %d process(es) x %d accumulation step(s)",
                resolved.effective_batch, resolved.recipe.train.per_device_train_batch_size, resolved.world_size,
                resolved.accumulation)
    key = (resolved.effective_batch, resolved.world_size)
    if resolved.world_size > 1 and resolved.recipe.train.global_batch_size is None and key not in _WARNED:  # a helper
        _WARNED.add(key)  # once per process, not per run of a sweep
        one = resolved.effective_batch // resolved.world_size
        logger.warning("the optimizer batch is %d on %d processes, %d on one: the learning rate (%g) was set for the "
                       "recipe's batch; train.global_batch_size=%d keeps that whatever the processes (per_device_train_batch_size "
                       "x processes must divide it)",
                       resolved.effective_batch, resolved.world_size, one, resolved.recipe.train.learning_rate, one)

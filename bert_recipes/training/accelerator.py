"""The Accelerate side of a run, shared by pretraining and fine-tuning.

- :func:`make_accelerator`: precision, trackers and the run directory.
- :func:`check_launch`: the launch-dependent refusals a preflight makes (DeepSpeed with
  accumulation, FSDP version 1), before anything is written.
- :func:`sharded_parameters`, :func:`in_lockstep`: evaluation batches when every forward
  is a collective (FSDP).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ..attention import kernels_for_packed_batches
from ..errors import UserError
from ..recipe_files import flatten
from .host_memory import keep_freed_memory
from .precision import describe_device, resolve_precision
from .reporting import trackers_for

logger = logging.getLogger("bert_recipes")


def _allow_precision(precision: str) -> None:
    """Let a process start a run at another precision than its previous run (a ``glue`` sweep's
    next task, in-process tests): Accelerate keeps one ``AcceleratorState`` per process and
    refuses a new ``mixed_precision`` with a traceback. Without FSDP or DeepSpeed that state is
    dropped (as Accelerate's own tests do between cases); the process state (ranks, process
    group) stays, and a finished run keeps nothing that reads it. DeepSpeed keeps its own
    precision (Accelerate accepts any there); FSDP's plugin is set up only with a fresh process
    state, so there the change is refused.

    Raises:
        UserError: under FSDP, a precision other than the process's first run's.
    """
    from accelerate.state import AcceleratorState

    shared = AcceleratorState._shared_state
    if not shared or shared.get("_mixed_precision") == precision or shared.get("distributed_type") == "DEEPSPEED":
        return
    if shared.get("distributed_type") == "FSDP":
        raise UserError(f"precision: {precision} after a run at {shared.get('_mixed_precision')} in this process; "
                        "under FSDP a process runs one precision: set the same precision, or launch this run on its own")
    AcceleratorState._reset_state(reset_partial_state=False)


def launch_state():
    """Accelerate's process state (rank, world size, distributed type) from the launcher's
    environment, without creating an ``Accelerator``: what a preflight may read."""
    from accelerate import PartialState

    return PartialState(cpu=_ranks_without_accelerator())


def finish_trackers(accelerator) -> None:
    """End a run's trackers, keeping the process group: ``Accelerator.end_training`` also
    destroys it, and the next run of the same process (a GLUE sweep's, a seed's) then failed
    at its first collective on several ranks (found by a helper). The command line destroys
    the group once, at the end (:func:`end_process_group`)."""
    for tracker in accelerator.trackers:
        tracker.finish()


def end_process_group() -> None:
    """Destroy the default process group, if this process made one (torch imported, and a
    launch of several ranks): once, at the end of a command that succeeded."""
    import sys

    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def make_accelerator(recipe):
    """An ``Accelerator`` for the recipe's ``precision`` (``auto`` resolved for this device by
    :func:`~bert_recipes.training.precision.resolve_precision` and logged) and ``report_to``
    (trackers not yet started: :func:`start_trackers` does that once the output directory is ready).
    On a CPU device with ``keep_host_memory`` (the default), freed host memory stays with the
    process (:func:`~bert_recipes.training.host_memory.keep_freed_memory`), logged. On a CUDA
    device with packed batches (``data.packing``), cuDNN's SDPA backend is turned off
    (:func:`~bert_recipes.attention.kernels_for_packed_batches`), logged.

    Raises:
        UserError: the Accelerate config asks for FSDP version 1.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    device_type = launch_state().device.type
    precision = resolve_precision(recipe.precision, device_type)
    _allow_precision(precision)
    accelerator = Accelerator(
        cpu=_ranks_without_accelerator(),
        mixed_precision=precision,
        log_with=trackers_for(recipe.report_to) or None,
        project_config=ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")),
    )
    check_fsdp_version(accelerator)
    host_memory = keep_freed_memory() if recipe.keep_host_memory and accelerator.device.type == "cpu" else None
    attention = kernels_for_packed_batches(accelerator.device.type, recipe.data.packing)
    if accelerator.is_main_process:
        chosen = f" (precision: auto on {describe_device(device_type)})" if recipe.precision == "auto" else ""
        logger.info("accelerate: %s, %d process(es), device %s, mixed precision %s%s", accelerator.distributed_type.value,
                    accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision, chosen)
        if host_memory:
            logger.info("host memory: %s", host_memory)
        if attention:
            logger.info("attention: %s", attention)
    return accelerator


def start_run(plan, doomed: list[str]):
    """What every command does first once its preflight passed: the ``Accelerator``, the
    effective-batch log line, the seed, the prepared output directory (``doomed`` deleted
    under ``overwrite``) and the trackers. Returns ``(accelerator, output_dir)``."""
    from accelerate.utils import set_seed

    from .outdir import prepare_output_dir
    from .plan import log_plan

    recipe = plan.recipe
    accelerator = make_accelerator(recipe)
    if accelerator.is_main_process:
        log_plan(plan)
    set_seed(recipe.seed)
    out = prepare_output_dir(recipe, accelerator, doomed)
    start_trackers(accelerator, recipe)
    return accelerator, out


def start_trackers(accelerator, recipe, project_name: str = "bert-recipes") -> None:
    """Start the recipe's trackers: the project ``project_name``, a run named after the run
    directory (``runs/glue/rte/seed-42`` -> ``glue/rte/seed-42``), the recipe as config."""
    trackers = trackers_for(recipe.report_to)
    if trackers:
        name = run_name(recipe.output_dir)
        init_kwargs = {"trackio": {"name": name}, "wandb": {"name": name}}
        accelerator.init_trackers(project_name, config=flatten(recipe.model_dump(mode="json")),
                                  init_kwargs={key: value for key, value in init_kwargs.items() if key in trackers})


def check_trackers_installed(trackers: list[str]) -> None:
    """Raise a one-line ``UserError`` for a tracker in ``report_to`` whose package is missing."""
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "trackio": is_trackio_available, "wandb": is_wandb_available}
    for name in trackers:
        if not available[name]():
            raise UserError(f"report_to: '{name}' needs the {name} package; install it with "
                            f"'pip install {name}' (or pip install -e '.[trackers]') or remove it from report_to")


def check_launch(recipe, accumulation: int) -> None:
    """Refuse, before anything is written, what this launch cannot train.

    Raises:
        UserError: a tracker of ``report_to`` is not installed (Accelerate would drop it
            silently), or DeepSpeed with ``accumulation`` > 1 micro-batches per step
            (DeepSpeed steps inside backward, so the loop's exact accumulation cannot run),
            or ``precision: fp16`` on a CPU (Accelerate would log fp16 and train in fp32).
    """
    check_trackers_installed(trackers_for(recipe.report_to))
    state = launch_state()
    if recipe.precision == "fp16" and state.device.type == "cpu":
        raise UserError("precision: fp16 needs a GPU (on a CPU Accelerate would train in fp32 while logging fp16); "
                        "use precision=bf16 or auto on a CPU")
    if state.distributed_type == "DEEPSPEED" and accumulation > 1:
        raise UserError("train.gradient_accumulation_steps: DeepSpeed steps inside backward; use 1 with DeepSpeed "
                        "(raise per_device_train_batch_size or the number of processes instead)")


def check_fsdp_version(accelerator) -> None:
    """Refuse FSDP1 in one line: evaluation runs the unwrapped model, which only FSDP2
    (``fully_shard``, sharding in place) can run; FSDP1 wraps and flattens the parameters."""
    if accelerator.distributed_type == "FSDP" and not accelerator.is_fsdp2:
        raise UserError("accelerate config: fsdp_config.fsdp_version 1 is not supported; use fsdp_version: 2 "
                        "(as recipes/accelerate/fsdp.yaml does)")


def run_name(output_dir: str | os.PathLike) -> str:
    """The tracker run name: the run directory relative to a ``runs/`` folder, else its name."""
    parts = Path(output_dir).resolve().parts
    parents = parts[:-1]
    if "runs" in parents:
        index = len(parents) - 1 - parents[::-1].index("runs")
        return "/".join(parts[index + 1:])
    return parts[-1]


def sharded_parameters(accelerator) -> bool:
    """Whether the prepared model's parameters are sharded across ranks (FSDP, DeepSpeed),
    so that every forward pass all-gathers them: a collective every rank must join."""
    return accelerator.num_processes > 1 and accelerator.distributed_type in ("FSDP", "DEEPSPEED")


def in_lockstep(accelerator, batches: Iterable, placeholder: Callable[[], object]) -> Iterator[tuple[object, bool]]:
    """Yield ``(batch, True)`` for this rank's batches, padded so that all ranks run the same
    number of forward passes when parameters are sharded.

    Evaluation data is split unevenly across ranks (a rank may get one batch more, or none).
    With FSDP/DeepSpeed each forward all-gathers the weights, so a rank that stopped early
    would leave the others waiting forever. Here ranks agree before each batch whether any
    rank still has one; a rank that has run out yields ``(placeholder(), False)``: run it
    and discard the outputs. Without sharding, batches pass through with no communication.
    """
    if not sharded_parameters(accelerator):
        for batch in batches:
            yield batch, True
        return
    iterator = iter(batches)
    while True:
        batch = next(iterator, None)
        has_batch = torch.tensor([0 if batch is None else 1], device=accelerator.device)
        if int(accelerator.reduce(has_batch, reduction="sum")) == 0:
            return
        yield (batch, True) if batch is not None else (placeholder(), False)


def launched_processes() -> int:
    """The launcher's ``WORLD_SIZE`` (torchrun), 1 without one or when it is not a number
    (``WORLD_SIZE=abc`` was a traceback: found by a helper). Reads the environment only."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))
    except ValueError:
        return 1


def _ranks_without_accelerator() -> bool:
    """True for ranks started by torchrun (``accelerate launch`` with a multi-GPU config) on a
    machine without GPUs: Accelerate then needs ``cpu=True`` to join them with gloo, else each
    rank would train alone (``DistributedType.NO``) and the ranks would overwrite each other."""
    if launched_processes() <= 1:
        return False
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return not (accel.is_available() if accel is not None else torch.cuda.is_available())

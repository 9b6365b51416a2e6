"""Pieces of the Accelerate training loop shared by pretraining and fine-tuning.

- :func:`make_accelerator`: precision, trackers and the run directory.
- :func:`prepare_output_dir`: refuse to train into another run's directory.
- :func:`optimizer_step`: clip, skip non-finite steps, step optimizer and scheduler.
- :class:`StopRequest`: SIGTERM/SIGINT -> save at the next step boundary and exit.
- :func:`in_lockstep`: evaluation batches when every forward is a collective (FSDP).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from ..errors import UserError
from .reporting import trackers_for

logger = logging.getLogger("bert_recipes")

RUN_MARKERS = ("recipe.yaml", "metrics.jsonl", "checkpoints", "final")


class TrainingError(UserError):
    """Training cannot go on (e.g. too many consecutive non-finite losses)."""

    exit_code = 1


def make_accelerator(recipe, project_name: str = "bert-recipes"):
    """An ``Accelerator`` for the recipe's ``precision`` and ``report_to``, trackers started.

    Trackers log into the project ``project_name`` under a run named after the run
    directory (``runs/glue/rte/seed-42`` -> ``glue/rte/seed-42``).

    Raises:
        UserError: ``report_to`` names a tracker whose package is not installed (Accelerate
            would silently drop it), or the Accelerate config asks for FSDP version 1.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    trackers = trackers_for(recipe.report_to)
    check_trackers_installed(trackers)
    accelerator = Accelerator(
        cpu=_ranks_without_accelerator(),
        mixed_precision=recipe.precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=recipe.output_dir, logging_dir=str(Path(recipe.output_dir) / "logs")),
    )
    check_fsdp_version(accelerator)
    if accelerator.is_main_process:
        logger.info("accelerate: %s, %d process(es), device %s, mixed precision %s", accelerator.distributed_type.value,
                    accelerator.num_processes, accelerator.device.type, accelerator.mixed_precision)
    if trackers:
        config = _flatten(recipe.model_dump(mode="json"))
        name = run_name(recipe.output_dir)
        init_kwargs = {"trackio": {"name": name}, "wandb": {"name": name}}
        accelerator.init_trackers(project_name, config=config,
                                  init_kwargs={key: value for key, value in init_kwargs.items() if key in trackers})
    return accelerator


def check_trackers_installed(trackers: list[str]) -> None:
    """Raise a one-line ``UserError`` for a tracker in ``report_to`` whose package is missing."""
    from accelerate.utils import is_tensorboard_available, is_trackio_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "trackio": is_trackio_available, "wandb": is_wandb_available}
    for name in trackers:
        if not available[name]():
            raise UserError(f"report_to: '{name}' needs the {name} package; install it with "
                            f"'pip install {name}' (or pip install -e '.[trackers]') or remove it from report_to")


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


def _ranks_without_accelerator() -> bool:
    """True for ranks started by torchrun (``accelerate launch`` with a multi-GPU config) on a
    machine without GPUs: Accelerate then needs ``cpu=True`` to join them with gloo, else each
    rank would train alone (``DistributedType.NO``) and the ranks would overwrite each other."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    accel = getattr(torch, "accelerator", None)  # torch >= 2.6: CUDA, XPU, MPS, ...
    return not (accel.is_available() if accel is not None else torch.cuda.is_available())


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


def prepare_output_dir(recipe, accelerator) -> Path:
    """Create ``output_dir``; refuse one that holds another run.

    A directory holding a previous run is accepted only when resuming (``resume_from``) or
    with ``overwrite: true``, which deletes that run's artefacts (recipe, metrics,
    checkpoints, export, tokenizer) and nothing else.

    Raises:
        UserError: the directory holds another run and neither option is set, or it is a file.
    """
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: '{out}' exists and is not a directory")
    previous = [name for name in RUN_MARKERS if (out / name).exists()]
    if previous and not recipe.resume_from:
        if not recipe.overwrite:
            raise UserError(
                f"output_dir: '{out}' already holds a run ({', '.join(previous)}); "
                "set resume_from=latest to continue it or overwrite=true to replace it"
            )
        _check_overwrite_is_safe(recipe, out)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            for name in (*RUN_MARKERS, "tokenizer", "logs", "summary.json"):
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def _run_kind(raw: dict) -> str:
    """``fine-tuning`` or ``pretraining``, for a recipe as a dict."""
    from ..recipe import is_finetuning_recipe

    return "fine-tuning" if is_finetuning_recipe(raw) else "pretraining"


def _check_overwrite_is_safe(recipe, out: Path) -> None:
    """``overwrite: true`` never deletes what the run reads, nor a run of the other kind.

    Raises:
        UserError: the model or tokenizer to load lies inside ``out``, or ``out`` holds a
            pretraining run and this is a fine-tuning run (or the reverse).
    """
    import yaml

    sources = {"model.name_or_path": recipe.model.name_or_path}
    if hasattr(recipe, "tokenizer_name_or_path"):  # fine-tuning
        sources["tokenizer_name_or_path"] = recipe.tokenizer_name_or_path
    else:
        sources["tokenizer.name_or_path"] = recipe.tokenizer.name_or_path
    root = out.resolve()
    for key, source in sources.items():
        if source and os.path.isdir(os.path.expanduser(source)):
            path = Path(os.path.expanduser(source)).resolve()
            if path == root or root in path.parents:
                raise UserError(f"output_dir: '{out}' contains {key} '{source}', which this run reads; "
                                "overwrite=true would delete it: choose another output_dir")
    try:
        previous = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return
    this = _run_kind(recipe.model_dump())
    if isinstance(previous, dict) and _run_kind(previous) != this:
        raise UserError(f"output_dir: '{out}' holds a {_run_kind(previous)} run; overwrite=true only replaces a "
                        f"{this} run: choose another output_dir")


def optimizer_step(accelerator, model, optimizer, scheduler, loss_value: float, max_grad_norm: float, state, max_bad: int) -> float:
    """Clip gradients and take one optimizer step unless the loss or gradients are not finite.

    A non-finite step is skipped (gradients dropped, weights untouched) and counted in
    ``state.skipped_steps`` / ``state.consecutive_nonfinite``; with fp16, overflowing
    gradients are left to the gradient scaler, which skips the step and lowers its scale.
    The scheduler advances either way, so the learning rate follows the step counter.

    Returns:
        The global gradient norm before clipping (``nan`` when the loss was not finite).

    Raises:
        TrainingError: more than ``max_bad`` consecutive non-finite steps.
    """
    grad_norm = float("nan")
    finite_loss = math.isfinite(loss_value)
    if finite_loss:
        limit = max_grad_norm if max_grad_norm > 0 else float("inf")
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), limit))
    if finite_loss and (math.isfinite(grad_norm) or accelerator.mixed_precision == "fp16"):
        optimizer.step()
        state.consecutive_nonfinite = 0
    else:
        state.skipped_steps += 1
        state.consecutive_nonfinite += 1
        logger.warning("step %d: non-finite loss or gradient; step skipped (%d in a row)", state.step + 1, state.consecutive_nonfinite)
        if state.consecutive_nonfinite > max_bad:
            raise TrainingError(
                f"train.max_consecutive_nonfinite_steps: {state.consecutive_nonfinite} consecutive steps had a "
                "non-finite loss or gradient; lower train.learning_rate or check the data. The last checkpoint is intact."
            )
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


class StopRequest:
    """Turns SIGTERM and SIGINT into a flag checked at step boundaries.

    A second signal of the same kind restores the default handler's behaviour. The last
    signal that stopped a run is kept for the command's exit code (:func:`stopped_exit_code`).
    """

    last_signal: str | None = None

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = StopRequest.last_signal = signal.Signals(signum).name
        logger.warning("%s received: saving a checkpoint at the next step boundary", self.requested)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def flag(self, device) -> torch.Tensor:
        return torch.tensor(1.0 if self.requested else 0.0, device=device)


def stopped_exit_code() -> int:
    """The exit code of a run stopped by a signal after saving its checkpoint: 128 + the
    signal number, as a shell reports a process ended by it (SIGINT 130, SIGTERM 143), so
    that ``make pretrain && make finetune`` or a job script does not go on as if it had finished."""
    name = StopRequest.last_signal or "SIGTERM"
    return 128 + int(getattr(signal, name))

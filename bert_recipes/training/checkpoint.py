"""Atomic checkpoints, resume, and the final ``save_pretrained`` export.

Layout of a run directory::

    output_dir/
      recipe.yaml                     the fully resolved recipe
      tokenizer/                      the tokenizer the run trains with
      metrics.jsonl                   one JSON object per logged step / eval
      checkpoints/checkpoint-00000100/
        model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl, ...
        data_state_rank<r>.pt         the data stream position of rank r
        trainer_state.json            step counter and bookkeeping
        recipe.yaml
        manifest.json                 size and sha256 of every file; written last
      final/                          the export: model + tokenizer + recipe + model card

A checkpoint is written by ``accelerator.save_state`` into a hidden temporary directory,
flushed to disk, described by ``manifest.json``, and only then renamed to its final name;
older checkpoints beyond ``save_total_limit`` are pruned after that. A checkpoint without
a manifest, or whose files do not match it, is skipped on resume with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..atomic import building, make_readable, swap_in, write_json
from ..errors import UserError
from ..recipe_files import save_recipe

logger = logging.getLogger("bert_recipes")

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
ASIDE_RE = re.compile(r"^\.checkpoint-(\d+)\.old$")  # set aside by atomic.swap_in while replacing it
MANIFEST = "manifest.json"
TRAINER_STATE = "trainer_state.json"


@dataclass
class TrainerState:
    """Bookkeeping restored on resume (the model, optimizer and RNGs are restored by
    Accelerate; the scheduler's state travels in ``extra["scheduler"]``)."""

    step: int = 0
    skipped_steps: int = 0
    consecutive_nonfinite: int = 0
    best_metric: float | None = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainerState":
        """The state saved by :func:`save_checkpoint` (keys of older versions are ignored)."""
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_manifest(directory: Path) -> None:
    files = {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
        for p in sorted(directory.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    write_json(directory / MANIFEST, {"files": files})


def verify_checkpoint(directory: Path) -> str | None:
    """Return None when ``directory`` is a complete checkpoint, else the reason it is not."""
    manifest = directory / MANIFEST
    if not manifest.is_file():
        return "no manifest.json (the save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable"
    for name, meta in files.items():
        path = directory / name
        if not path.is_file():
            return f"missing {name}"
        if path.stat().st_size != meta["size"]:
            return f"{name} is truncated ({path.stat().st_size} of {meta['size']} bytes)"
        if _sha256(path) != meta["sha256"]:
            return f"{name} is corrupt (checksum mismatch)"
    return None


def checkpoint_path(root: Path, step: int) -> Path:
    """The folder of the checkpoint of ``step`` under ``root``."""
    return root / f"checkpoint-{step:08d}"


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under ``root``, oldest first; a ``.checkpoint-N.old`` that
    :func:`~bert_recipes.atomic.swap_in` set aside counts as checkpoint N when that is
    missing (a kill between its two renames: it is the only copy; :func:`clear_leftovers`
    puts it back at the next save)."""
    if not root.is_dir():
        return []
    found = {}
    for path in root.iterdir():
        m = CHECKPOINT_RE.match(path.name) or ASIDE_RE.match(path.name)
        if m and path.is_dir() and (int(m.group(1)) not in found or not path.name.startswith(".")):
            found[int(m.group(1))] = path
    return [found[step] for step in sorted(found)]


def find_resume_checkpoint(resume_from: str, root: Path) -> Path | None:
    """Resolve ``resume_from`` (``latest`` or a path) to a verified checkpoint.

    ``latest`` picks the newest complete checkpoint under ``root``; incomplete or corrupt
    ones are skipped with a warning, and None is returned when there is none (a fresh
    start). An explicit path must be a complete checkpoint.

    Raises:
        UserError: an explicit path that is missing or incomplete.
    """
    if resume_from == "latest":
        for candidate in reversed(list_checkpoints(root)):
            problem = verify_checkpoint(candidate)
            if problem is None:
                return candidate
            logger.warning("skipping checkpoint %s: %s; trying the previous one", candidate, problem)
        return None
    path = Path(resume_from).expanduser()
    if not path.is_dir():
        raise UserError(f"resume_from: checkpoint directory '{resume_from}' not found (or use 'latest')")
    problem = verify_checkpoint(path)
    if problem:
        raise UserError(f"resume_from: '{resume_from}' is not a complete checkpoint: {problem}")
    return path


def _assert_finite(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            raise RuntimeError(f"refusing to save a checkpoint: parameter {name} holds NaN/Inf")


def save_checkpoint(accelerator, model: torch.nn.Module, scheduler, root: Path, state: TrainerState, recipe,
                    data_state: dict | None, keep: int) -> Path:
    """Atomically save the full training state as ``root/checkpoint-<step>``: model,
    optimizer, RNGs (Accelerate), ``scheduler``, ``state``, this rank's ``data_state``
    (None: the job has none) and the recipe; keep the newest ``keep`` checkpoints.

    Every rank must call this (Accelerate gathers; each rank writes its RNG and data
    state). Returns the final checkpoint path.

    Raises:
        RuntimeError: a parameter holds NaN/Inf (never saved over a good checkpoint).
    """
    state.extra["scheduler"] = scheduler.state_dict()
    final = checkpoint_path(root, state.step)
    tmp = root / f".tmp-checkpoint-{state.step:08d}"
    if accelerator.is_main_process:
        _assert_finite(accelerator.unwrap_model(model))
        clear_leftovers(root)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with building(tmp, clean=accelerator.is_main_process):  # a failed save (disk full) leaves no half folder
        accelerator.save_state(str(tmp))
        if data_state is not None:
            torch.save(data_state, tmp / f"data_state_rank{accelerator.process_index}.pt")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json(tmp / TRAINER_STATE, asdict(state))
            save_recipe(recipe, tmp)
            make_readable(tmp)
            _fsync_tree(tmp)
            _write_manifest(tmp)
            _fsync_tree(tmp)
    if accelerator.is_main_process:
        swap_in(tmp, final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def clear_leftovers(root: Path) -> None:
    """What a kill during an earlier save left in ``root`` (the main process, which holds the
    run's lock): half-written ``.tmp-checkpoint-*`` folders are deleted (they stayed for good,
    outside ``save_total_limit``: found by a helper), and a ``.checkpoint-*.old`` set aside by
    :func:`~bert_recipes.atomic.swap_in` is deleted when its checkpoint is back in place, else
    renamed back (it is the only copy)."""
    if not root.is_dir():
        return
    for stale in root.glob(".tmp-checkpoint-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for aside in root.glob(".checkpoint-*.old"):
        kept = root / aside.name[1:].removesuffix(".old")
        if kept.exists():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(aside, kept)


def check_data_layout(path: Path, processes: int, check_state=None) -> None:
    """Before anything is loaded or logged: the checkpoint at ``path`` was saved by as many
    processes as this launch has (``processes``): a data state per process
    (``data_state_rank<r>.pt``) or, without those (fine-tuning), Accelerate's random states
    (``random_states_<r>.pkl``); ``check_state(rank 0's data state)`` checks the rest of the
    layout (the DataLoader workers).

    Raises:
        UserError / DataError: another number of processes (or what ``check_state`` refuses).
    """
    saved = len(list(path.glob("data_state_rank*.pt")))
    ranks = saved or len(list(path.glob("random_states_*.pkl")))  # Accelerate's, one per process
    if ranks and ranks != processes:
        raise UserError(f"resume_from: {path} was saved by {ranks} process(es) and this launch has {processes}: "
                        f"resume with {ranks} (accelerate launch --num_processes {ranks}); each rank's "
                        f"{'data position' if saved else 'random state and share of the batches'} is saved separately")
    if saved and check_state is not None:
        check_state(torch.load(path / "data_state_rank0.pt", map_location="cpu", weights_only=True))


def _settings(group: dict) -> dict:
    """An optimizer param group's settings but its parameters and learning rate (the schedule's)."""
    return {key: value for key, value in group.items() if key not in ("params", "lr", "initial_lr")}


def _same_setting(saved, wanted) -> bool:
    """An optimizer setting unchanged: ``[0.9, 0.999]`` (as FSDP's loaded state holds betas) is ``(0.9, 0.999)``."""
    as_tuple = lambda value: tuple(value) if isinstance(value, list) else value  # noqa: E731
    return as_tuple(saved) == as_tuple(wanted)


def load_checkpoint(accelerator, path: Path, scheduler, optimizer=None) -> tuple[TrainerState, dict | None]:
    """Restore model, optimizer, ``scheduler``, scaler and RNGs; return the trainer state and
    this rank's data-stream state (None when the checkpoint has none). The preflight has
    checked the data states' layout (:func:`check_data_layout`).

    ``optimizer`` (the prepared one, built from the recipe): its settings other than the
    learning rate (``weight_decay``, ``betas``, ``eps``, ...) stay the recipe's, and a change
    from the checkpoint's is logged. Loading an optimizer's state restores the saved settings,
    so a resume with a new ``train.weight_decay`` or ``adam_epsilon`` ran with the old one while
    its ``recipe.yaml`` said the new one. The learning rate is the schedule's (:mod:`.resume`).
    """
    recipe_groups = [_settings(group) for group in optimizer.param_groups] if optimizer is not None else []
    accelerator.load_state(str(path))
    state = TrainerState.from_dict(json.loads((path / TRAINER_STATE).read_text()))
    scheduler.load_state_dict(state.extra["scheduler"])
    changed = {}
    for group, wanted in zip(optimizer.param_groups if optimizer is not None else (), recipe_groups):
        changed.update({key: (group[key], value) for key, value in wanted.items()
                        if not _same_setting(group.get(key), value)})
        group.update(wanted)
    if changed and accelerator.is_main_process:
        logger.info("resume from step %d: the recipe's optimizer settings apply: %s", state.step,
                    ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items()))
    data_file = path / f"data_state_rank{accelerator.process_index}.pt"
    if not data_file.is_file():
        return state, None
    data_state = torch.load(data_file, map_location="cpu", weights_only=True)
    return state, data_state

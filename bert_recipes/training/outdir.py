"""The run directory: refuse another run's, and replace one only when asked to.

:func:`check_output_dir` is the preflight half (reads only, raises one-line errors, says
what ``overwrite: true`` will delete); :func:`prepare_output_dir` is the destructive half,
run only once every check has passed.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import UserError

# A folder holds a run once training has started: it has logged a step, saved a checkpoint
# or exported. A run that failed before that (an empty corpus, a bad tokenizer) leaves only
# recipe.yaml and tokenizer/, and the same command can simply be run again.
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final", "best", "results.json")
RUN_FILES = (*RUN_MARKERS, "recipe.yaml", "tokenizer", "logs", "summary.json", "plots")  # plots: `bert-recipes plot`'s default folder


def check_output_dir(recipe, artefacts: tuple[str, ...] = ()) -> list[str]:
    """Check ``output_dir`` without touching it; return the names ``overwrite`` will delete.

    A directory holding a previous run (one that started training: ``metrics.jsonl``,
    ``checkpoints/``, an export) is accepted only when resuming (``resume_from``) or
    with ``overwrite: true``, which deletes that run's artefacts (recipe, metrics,
    checkpoints, export, tokenizer, and the command's own ``artefacts``) and nothing else.

    Raises:
        UserError: the directory holds another run and neither option is set, it is a
            file, it contains what this run reads, or it holds a run of the other kind.
    """
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: '{out}' exists and is not a directory")
    if recipe.resume_from:
        return []
    previous = [name for name in RUN_MARKERS if (out / name).exists()]
    if previous and not recipe.overwrite:
        raise UserError(f"output_dir: '{out}' already holds a run ({', '.join(previous)}); "
                        "set resume_from=latest to continue it, overwrite=true to replace it, "
                        "or output_dir=DIR for a new run")
    doomed = [name for name in (*RUN_FILES, *artefacts) if (out / name).exists()] if recipe.overwrite else []
    if doomed:
        _check_overwrite_is_safe(recipe, out)
    return doomed


def prepare_output_dir(recipe, accelerator, doomed: list[str]) -> Path:
    """Delete ``doomed`` (from :func:`check_output_dir`) and create ``output_dir``; every rank
    calls it, the main process writes."""
    out = Path(recipe.output_dir)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name in doomed:
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
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
        UserError: a folder of ``recipe.reads()`` lies inside ``out``, or ``out`` holds a
            pretraining run and this is a fine-tuning run (or the reverse).
    """
    import yaml

    root = out.resolve()
    for key, source in recipe.reads().items():
        if os.path.isdir(os.path.expanduser(source)):
            path = Path(os.path.expanduser(source)).resolve()
            if path == root or root in path.parents:
                raise UserError(f"output_dir: '{out}' contains {key} '{source}', which this run reads; "
                                "overwrite=true would delete it: choose another output_dir")
    try:
        previous = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return
    if isinstance(previous, dict) and _run_kind(previous) != recipe.kind:
        raise UserError(f"output_dir: '{out}' holds a {_run_kind(previous)} run; overwrite=true only replaces a "
                        f"{recipe.kind} run: choose another output_dir")

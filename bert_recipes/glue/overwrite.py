"""``overwrite: true`` on a GLUE sweep: what an earlier sweep into the same folder wrote for
the tasks being run (its cells, report, submission and exported encoders) is deleted before
the first run, once every run's own checks have passed, so that stale cells and a stale
``submission.zip`` never sit beside the new results. Other files stay.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from ..errors import UserError
from ..training.accelerator import launch_state
from ..training.outdir import RUN_FILES, RUN_MARKERS, check_unlocked, read_inside
from .finetune import RESULTS, check_inputs
from .grid import GRID_PNG, with_cell
from .recipe import FinetuneRecipe
from .report import RESULTS_JSON, RESULTS_MD, RESULTS_PNG
from .tasks import get_task

logger = logging.getLogger("bert_recipes")

#: What a sweep writes into its root (besides the tasks' folders).
SWEEP_FILES = (RESULTS_JSON, RESULTS_MD, RESULTS_PNG, GRID_PNG, "submission", "encoders")


def handle_earlier_sweep(root: Path, root_raw: dict, tasks: list[str], recipes: dict[str, FinetuneRecipe],
                         cells: dict[str, list[dict]], wnli_recipe: FinetuneRecipe | None) -> None:
    """Before a sweep's first run, what an earlier sweep into ``root`` left: ``overwrite``
    deletes it for these tasks (:func:`replace_earlier_sweep`); without ``resume_from`` its
    runs in these tasks' folders are refused (:func:`check_no_earlier_runs`); a report of
    other tasks this sweep's replaces is named (:func:`warn_dropped_tasks`).

    Raises:
        UserError: as those functions.
    """
    if root_raw.get("overwrite"):
        replace_earlier_sweep(root, recipes, cells, wnli_recipe)
        return
    if launch_state().is_main_process:
        warn_dropped_tasks(root, tasks)
    if not root_raw.get("resume_from"):
        check_no_earlier_runs([*recipes.values(), *([wnli_recipe] if wnli_recipe else [])])


def warn_dropped_tasks(root: Path, tasks: list[str]) -> None:
    """Say so when ``root``'s report lists tasks this sweep does not run: its report, which
    lists only its own tasks, replaces that one (found by a helper)."""
    try:
        before = list(json.loads((root / RESULTS_JSON).read_text())["tasks"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    dropped = [name for name in before if name not in tasks]
    if dropped:
        logger.warning("%s lists %s from an earlier sweep: this sweep's report replaces it with %s only; to keep them "
                       "in one report, add them to --tasks with resume_from=latest (their finished runs are reused)",
                       root / RESULTS_JSON, ",".join(dropped), ",".join(tasks))


def replace_earlier_sweep(root: Path, recipes: dict[str, FinetuneRecipe], cells: dict[str, list[dict]],
                          wnli_recipe: FinetuneRecipe | None) -> None:
    """``overwrite=true``: once every run's own checks pass (:func:`check_runs`; a refused
    sweep deletes nothing), delete what an earlier sweep wrote for these tasks (:func:`sweep_doomed`)."""
    check_runs(recipes, cells)
    doomed = sweep_doomed(root, [*recipes.values(), *([wnli_recipe] if wnli_recipe else [])])
    check_unlocked(doomed)  # a sweep still running there: its runs hold their folders' locks
    if launch_state().is_main_process:
        for path in doomed:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    launch_state().wait_for_everyone()


def check_runs(recipes: dict[str, FinetuneRecipe], cells: dict[str, list[dict]]) -> None:
    """The checks each run of the sweep makes in its own preflight, short of its output
    folder: what it reads (:func:`~.finetune.check_inputs`) and every cell's batch plan and
    launch.

    Raises:
        UserError / DataError: the first run that would be refused.
    """
    from ..training.accelerator import check_launch
    from ..training.plan import resolve

    processes = launch_state().num_processes
    for name, recipe in recipes.items():
        # an init_from_task run starts from the source's encoder, its head dropped: the base's labels do not matter
        check_inputs(recipe.model_copy(update={"init_from_task": None}), get_task(name), labels=not recipe.init_from_task)
        for cell in cells[name]:
            cell_recipe = with_cell(recipe, cell)
            check_launch(cell_recipe, resolve(cell_recipe, processes, log=False).accumulation)


def earlier_runs(recipes: list[FinetuneRecipe]) -> list[Path]:
    """What an earlier sweep left in these tasks' folders: its results and every run or cell
    folder (one holding a ``recipe.yaml`` or ``results.json``), existing paths only."""
    found = []
    for recipe in recipes:
        folder = Path(recipe.output_dir)
        found += [folder / name for name in RUN_FILES]
        if folder.is_dir():
            found += [child for child in sorted(folder.iterdir())
                      if child.is_dir() and ((child / "recipe.yaml").exists() or (child / RESULTS).exists())]
    return [path for path in dict.fromkeys(found) if path.exists()]


def sweep_doomed(root: Path, recipes: list[FinetuneRecipe]) -> list[Path]:
    """What ``overwrite=true`` on a sweep deletes before its first run: the report, the
    submission and the exported encoders in ``root``, and in each of these tasks' folders
    :func:`earlier_runs`; other files stay. An earlier sweep's stale cells and its
    ``submission.zip`` used to stay next to the new results (found by a helper).

    Raises:
        UserError: a model or tokenizer a task reads lies inside what would be deleted.
    """
    doomed = [path for path in (root / name for name in SWEEP_FILES) if path.exists()] + earlier_runs(recipes)
    for recipe in recipes:
        for path in doomed:
            read = read_inside(recipe, path)
            if read:
                raise UserError(f"output_dir: '{path}' contains {read[0]} '{read[1]}', which this sweep reads; "
                                "overwrite=true would delete it: choose another output_dir")
    return doomed


def check_no_earlier_runs(recipes: list[FinetuneRecipe]) -> None:
    """Without ``resume_from`` or ``overwrite``: a task folder holding an earlier run is
    refused before any task trains (it was refused at its task's turn, after the tasks
    before it had trained: found by a helper).

    Raises:
        UserError: the first such folder, naming what it holds.
    """
    for recipe in recipes:
        taken = [path for path in earlier_runs([recipe]) if path.name in RUN_MARKERS or path.name not in RUN_FILES]
        if taken:  # a run's markers (as check_output_dir), or its cells' / seeds' folders
            raise UserError(f"output_dir: '{recipe.output_dir}' already holds a run ({', '.join(p.name for p in taken)}); "
                            "set resume_from=latest to continue the sweep, overwrite=true to replace it, or "
                            "output_dir=DIR for a new sweep")


__all__ = ["SWEEP_FILES", "check_no_earlier_runs", "check_runs", "earlier_runs", "handle_earlier_sweep", "replace_earlier_sweep",
           "sweep_doomed", "warn_dropped_tasks"]

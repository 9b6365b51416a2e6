"""Fine-tune several GLUE tasks from one base recipe and summarise them (``bert-recipes glue``).

For each task, the recipe is the base recipe, then the task's own file
``<base folder>/<task>.yaml`` when there is one (its keys, without its ``base:``), then the
command-line overrides; ``task`` is set and ``output_dir`` becomes ``<output_dir>/<task>``.
Every task recipe is validated (and its GLUE folder found) before any training starts.

With a ``sweep.grid`` (see :class:`~bert_recipes.glue.recipe.SweepConfig`) each task runs
every cell of its grid once per seed into ``<task>/<cell>/seed-<s>`` and keeps the cell with
the best dev main metric averaged over seeds (``protocol: select``), or runs one
configuration for every task (``protocol: fixed``). ``init_from_task`` orders the tasks
(sources first) and starts a task from its source's chosen encoder (:mod:`.transfer`).
``sweep.wnli`` includes WNLI, leaves it out, or answers it with the majority class.

Written into the base recipe's ``output_dir``:

- ``glue_results.json``: per task its dev metrics (mean and std with several seeds), its
  leaderboard entries, best export and run time; the GLUE score (the average of the
  entries of the tasks run: MNLI-m and MNLI-mm count as two, see
  :func:`~bert_recipes.glue.metrics.glue_score`);
- ``glue_results.md``: the same as a Markdown table (chosen configuration, mean ± std and
  median over seeds, time, examples/s), the GLUE score last with the entries it averages,
  the protocol, then every grid cell;
- ``glue_results.png``: a bar chart of the entries and the score;
- ``glue_grid.png``: with a grid, a heatmap of every task's cells (the chosen one framed);
- with ``predict_test``: ``submission/submission.zip`` for gluebenchmark.com, with AX
  predicted by the MNLI model when MNLI is run and the AX data is available.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from pydantic import ValidationError

from ..atomic import write_json, write_text
from ..errors import UserError
from ..recipe import save_recipe, validate
from ..recipe_files import apply_overrides, deep_merge, load_raw, override_for, read_yaml
from ..training.accelerator import launch_state
from ..training.reporting import progress
from .data import glue_task_dir
from .evaluation import predict_export
from .finetune import RESULTS, check_inputs
from .seeds import finetune_seeds
from .overwrite import handle_earlier_sweep
from .grid import GRID_PNG, SweepClock, cell_name, cell_summary, check_fixed, choose, plot_grid, with_cell
from .recipe import FinetuneRecipe, SweepConfig
from .report import (RESULTS_JSON, RESULTS_MD, RESULTS_PNG, entry_names, majority_class, plot_results,
                     results_markdown, summarise, what_cut, write_test_submission)
from .reuse import finished_results
from .tasks import TASKS, get_task
from .transfer import check_architectures, export_encoder

logger = logging.getLogger("bert_recipes")

TRAINABLE = tuple(name for name, task in TASKS.items() if task.dev_splits)


def parse_tasks(text: str | None) -> list[str]:
    """``"cola,SST-2,mnli"`` -> canonical names in the leaderboard's order (all 9 when None:
    no ``--tasks``).

    Raises:
        UserError: unknown or repeated task, AX (it is predicted by the MNLI model), or an
            empty list (``--tasks "$TASKS"`` with an unset variable started all nine).
    """
    if text is None:
        return list(TRAINABLE)
    names = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        task = get_task(item)
        if not task.dev_splits:
            raise UserError(f"--tasks: '{item}' is not trained; it is predicted with the {task.predicted_with} "
                            f"model (add {task.predicted_with} and --predict-test)")
        if task.name in names:
            raise UserError(f"--tasks: '{task.name}' is listed twice")
        names.append(task.name)
    if not names:
        raise UserError("--tasks: expected a comma-separated list such as cola,sst2,mrpc")
    return [name for name in TASKS if name in names]


def task_recipe(base: str | os.PathLike, task: str, overrides: list[str], root: Path, predict_test: bool) -> FinetuneRecipe:
    """The validated recipe of one task of the sweep (see the module doc for the layering)."""
    raw = load_raw(base)
    own = Path(base).parent / f"{task}.yaml"
    source = str(base)
    if own.is_file() and own.resolve() != Path(base).resolve():
        layer = read_yaml(own)
        layer.pop("base", None)
        raw = deep_merge(raw, layer)
        source = f"{base} + {own}"
    raw = apply_overrides(raw, overrides)
    raw.update(task=task, output_dir=str(root / task))
    if predict_test:
        raw["predict_test"] = True
    return validate(FinetuneRecipe, raw, source, overrides)  # an error set by an override names it


def sweep_settings(root_raw: dict, source: str, overrides: list[str] = ()) -> SweepConfig:
    """The base recipe's ``sweep`` section (protocol, WNLI option, shared grid), validated.

    Raises:
        RecipeError: a bad ``sweep`` key or value (one line, naming the override that set it).
    """
    section = root_raw.get("sweep") or {}
    if not isinstance(section, dict):
        where = override_for("sweep", list(overrides))
        raise UserError(f"{f'override {where!r}' if where else source}: sweep: expected a mapping, got {section!r}")
    try:
        return SweepConfig.model_validate(section)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(map(str, ("sweep", *first["loc"])))
        message = first["msg"].removeprefix("Value error, ")
        item = override_for(key, list(overrides))
        where = f"override '{item}'" if item else source
        raise UserError(f"{where}: {message if message.startswith('sweep.') else f'{key}: {message}'}") from None


def run_glue(base: str | os.PathLike, tasks: list[str], overrides: list[str] | None = None,
             predict_test: bool = False) -> dict | None:
    """Fine-tune ``tasks`` (each over its grid of cells x seeds) and write the results files.

    Tasks run sources first (``init_from_task``), each cell once per seed; a finished cell
    (its ``results.json``) is skipped with ``resume_from``. Before the first run, every
    recipe, GLUE folder, grid, source task and architecture is checked; after the first
    logging steps the whole sweep's training time is estimated and printed.

    Returns:
        The content of ``glue_results.json``.

    Raises:
        UserError: a bad recipe or grid, an unknown task, missing data, a missing source task
            or a mismatched architecture, a fixed protocol with several configurations
            (all checked before training).
        RunStopped: a run was stopped by a signal (its checkpoint resumes with
            ``resume_from=latest``; finished cells and tasks are reused).
    """
    overrides = list(overrides or [])
    root_raw = apply_overrides(load_raw(base), overrides)
    check_task_key(base, tasks, overrides, root_raw)
    root = Path(root_raw.get("output_dir") or FinetuneRecipe.model_fields["output_dir"].default)
    settings = sweep_settings(root_raw, str(base), overrides)
    wnli = "wnli" in tasks and settings.wnli != "include"
    recipes = {name: task_recipe(base, name, overrides, root, predict_test) for name in tasks}
    wnli_recipe = recipes.pop("wnli") if wnli else None
    cells, order = check_sweep(recipes, settings, root)
    if wnli_recipe is not None and settings.wnli == "majority":  # its data, before any training
        check_inputs(wnli_recipe, get_task("wnli"))
    handle_earlier_sweep(root, root_raw, tasks, recipes, cells, wnli_recipe)
    main = launch_state().is_main_process
    clock = SweepClock(*planned_work(recipes, cells), printer=print if main else (lambda *a, **k: None))
    results = {}
    with progress(total=len(order), desc="GLUE tasks", main=main) as bar:
        for name in order:
            bar.set_postfix_str(name)
            recipe = recipes[name]
            source = recipe.init_from_task
            if source:
                recipe = start_from_task(recipe, root, results.get(source))
            logger.info("GLUE %s -> %s", name, recipe.output_dir)
            # a stopped run raises RunStopped; finished cells are skipped on resume
            results[name] = run_task(recipe, cells[name], settings.protocol, clock, init_from=source)
            bar.update(1)
    if wnli_recipe is not None and settings.wnli == "majority":
        results["wnli"] = majority_class(wnli_recipe, root / "wnli", predict_test and main)
    results = {name: results[name] for name in tasks if name in results}  # the leaderboard's order
    summary = summarise(results, settings.protocol, settings.wnli if "wnli" in tasks else None)
    summary.update(recipe=str(base), output_dir=str(root), estimate_s=clock.estimate_s,
                   subsampled=what_cut(results, recipes[order[0]].data if order else None))
    if main:
        write_report(summary, results, root, predict_test)
    launch_state().wait_for_everyone()
    return summary


def check_task_key(base, tasks: list[str], overrides: list[str], root_raw: dict) -> None:
    """A sweep sets ``task`` for each of its tasks: a ``task=`` override, or a task file as
    the base recipe for other tasks than its own, were replaced silently and every task of
    ``--tasks`` (all nine by default) ran (found by helpers).

    Raises:
        UserError: either, with the ``--tasks`` to pass.
    """
    task_set = override_for("task", overrides)
    if task_set:
        raise UserError(f"override '{task_set}': the sweep sets task for each of its tasks; choose them with --tasks "
                        f"{task_set.partition('=')[2].strip() or 'TASK'}, or fine-tune one with `bert-recipes finetune`")
    own = get_task(root_raw["task"]).name if root_raw.get("task") else None  # SST-2 -> sst2, as --tasks reads it
    if own and tasks != [own]:
        raise UserError(f"{base}: sets task: {own}, and the sweep runs {','.join(tasks)}: pass --tasks {own}, or give a "
                        "base recipe without task (recipes/glue/base.yaml) for several tasks")


def check_sweep(recipes: dict[str, FinetuneRecipe], settings: SweepConfig, root: Path) -> tuple[dict, list[str]]:
    """Before any training: every task's GLUE folder, its grid (a fixed protocol has one
    configuration), the task order (sources first) and each source's architecture.
    Returns ``(cells per task, task order)``; raises ``UserError`` as :func:`run_glue`.
    """
    for recipe in recipes.values():
        if recipe.data.glue_dir is not None:
            glue_task_dir(recipe.data.glue_dir, recipe.task)
    cells = {name: recipe.sweep.cells(recipe.train) for name, recipe in recipes.items()}
    if settings.protocol == "fixed":
        check_fixed(recipes, cells)
    order = task_order(recipes, root)
    for name in order:
        source = recipes[name].init_from_task
        if source:
            source_model = recipes[source].model.name_or_path if source in recipes else finished_best(root, source)
            check_architectures(name, source, recipes[name].model.name_or_path, source_model,
                                recipes[name].model.trust_remote_code)
    return cells, order


def write_report(summary: dict, results: dict, root: Path, predict_test: bool) -> None:
    """``glue_results.json`` / ``.md`` / ``.png``, the grid heatmap and (``predict_test``) the submission."""
    root.mkdir(parents=True, exist_ok=True)
    if predict_test:
        summary["submission"] = str(write_test_submission(results, root / "submission"))
    grid_png = plot_grid(summary["tasks"], root / GRID_PNG)
    summary["grid_png"] = str(grid_png) if grid_png else None
    write_json(root / RESULTS_JSON, summary)
    write_text(root / RESULTS_MD, results_markdown(summary))
    plot_results(summary, root / RESULTS_PNG)


# --------------------------------------------------------------------------- planning


def finished_best(root: Path, task: str) -> str:
    """The chosen export of a task finished by an earlier sweep into ``root``.

    Raises:
        UserError: the task has no finished results there.
    """
    path = root / task / RESULTS
    if path.is_file():
        best = json.loads(path.read_text()).get("best")
        parts = Path(best).parts if best else ()
        if task in parts:  # the export's place under the task's folder, wherever the sweep is now (copied, moved)
            here = root / task / Path(*parts[len(parts) - parts[::-1].index(task):])
            best = str(here) if here.is_dir() else best
        if best and Path(best).is_dir():
            return best
    raise UserError(f"init_from_task '{task}': add {task} to --tasks (it runs first) or finish it into "
                    f"{root / task} first; {path} has no chosen model")


def task_order(recipes: dict[str, FinetuneRecipe], root: Path) -> list[str]:
    """The leaderboard's order with every ``init_from_task`` source before the tasks that
    start from it.

    Raises:
        UserError: a source that is neither run nor finished in ``root``, or a cycle.
    """
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        if name in visiting:
            raise UserError(f"init_from_task makes a cycle: {' -> '.join([*visiting, name])}")
        visiting.append(name)
        source = recipes[name].init_from_task
        if source in recipes:
            visit(source)
        elif source:
            finished_best(root, source)
        visiting.pop()
        order.append(name)

    for name in recipes:
        visit(name)
    return order


def planned_work(recipes: dict[str, FinetuneRecipe], cells: dict[str, list[dict]]) -> tuple[float, int]:
    """``(training examples, runs)`` of the runs not yet finished (finished ones: a
    ``results.json`` in the seed's folder with ``resume_from``): runs x (max_steps x batch,
    else epochs x train size)."""
    from .data import load_glue_split

    processes = launch_state().num_processes
    examples, runs = 0.0, 0
    for name, recipe in recipes.items():
        size = None
        for cell in cells[name]:
            out = cell_dir(recipe, cell, cells[name])
            folders = [out / f"seed-{seed}" for seed in recipe.seeds] or [out]  # as finetune_seeds runs them
            seeds = sum(not (recipe.resume_from and (folder / RESULTS).is_file()) for folder in folders)
            if not seeds:  # a finished cell; a seed added to it trains (it said "0 run(s)": found by a helper)
                continue
            train = recipe.train.model_copy(update=cell)
            if train.max_steps:
                per_run = train.max_steps * train.per_device_train_batch_size * processes * train.accumulation_for(processes)
            else:
                if size is None:
                    size = len(load_glue_split(name, "train", recipe.data.glue_dir))
                    size = min(size, recipe.data.max_train_samples or size)
                per_run = size * float(train.num_train_epochs)
            examples += seeds * per_run
            runs += seeds
    return examples, runs


def cell_dir(recipe: FinetuneRecipe, cell: dict, cells: list[dict]) -> Path:
    """A cell's run folder: the task's folder itself when the grid has no keys."""
    out = Path(recipe.output_dir)
    return out if cells == [{}] else out / cell_name(cell)


def start_from_task(recipe: FinetuneRecipe, root: Path, source_result: dict | None) -> FinetuneRecipe:
    """The recipe with ``model.name_or_path`` set to the source task's chosen encoder, head
    dropped (exported to ``<root>/encoders/<source>``); ``init_from_task`` is cleared (it
    is a sweep key; :func:`run_task` records it as ``init_from``)."""
    source = recipe.init_from_task
    best = source_result["best"] if source_result else finished_best(root, source)
    dest = root / "encoders" / source
    if launch_state().is_main_process:
        dest.parent.mkdir(parents=True, exist_ok=True)
        export_encoder(best, dest)
    launch_state().wait_for_everyone()
    logger.info("%s starts from %s's chosen encoder (%s)", recipe.task, source, best)
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"name_or_path": str(dest)}),
                                     "init_from_task": None})


# --------------------------------------------------------------------------- one task


def run_task(recipe: FinetuneRecipe, cells: list[dict], protocol: str, clock=None, init_from: str | None = None) -> dict:
    """Every cell of one task, then the choice.

    Returns:
        The task's results: the chosen cell's (``dev`` mean over seeds, ``runs``,
        ``best`` = its best seed's export, ``test_predictions`` from that export) with
        ``grid`` (every cell's :func:`~bert_recipes.glue.grid.cell_summary`),
        ``chosen_index``, ``config`` (the chosen train values), ``protocol``, ``init_from``,
        and ``runtime_s`` / ``train_examples`` / ``examples_per_s`` over all cells.
        Written to ``output_dir/results.json`` when the grid has keys.

    Raises:
        UserError: the task folder holds results and neither resume nor overwrite is set.
    """
    task, out = get_task(recipe.task), Path(recipe.output_dir)
    keys = ("learning_rate", "per_device_train_batch_size", "num_train_epochs", "max_steps")
    if cells == [{}]:
        result = dict(finetune_seeds(recipe, on_log=clock))
        summaries, index, runtime = [cell_summary(task, {}, result)], 0, result.get("runtime_s")
        config = {key: getattr(recipe.train, key) for key in keys}
    else:
        if (out / RESULTS).exists() and not (recipe.overwrite or recipe.resume_from):
            raise UserError(f"output_dir: '{out}' already holds a sweep ({RESULTS}); set resume_from=latest to "
                            "continue it cell by cell or overwrite=true to replace it")
        runs = []
        for cell in cells:  # a finished cell is reused when its recipe is this one (else refused or continued)
            where = cell_dir(recipe, cell, cells)
            cell_recipe = with_cell(recipe, cell, output_dir=str(where), predict_test=False)
            finished = finished_results(cell_recipe, where)
            if finished is not None:
                logger.info("%s %s: finished; skipped", task.name, where.name)
                runs.append(finished)
                continue
            logger.info("%s %s (%d seed(s))", task.name, where.name, max(1, len(recipe.seeds)))
            runs.append(finetune_seeds(cell_recipe, on_log=clock))
        summaries = [cell_summary(task, cell, r) for cell, r in zip(cells, runs)]
        index = choose(summaries) if protocol == "select" else 0
        result = dict(runs[index])
        runtime = round(sum(r.get("runtime_s") or 0.0 for r in runs), 1)
        result["train_examples"] = sum(int(r.get("train_examples") or 0) for r in runs)
        result["examples_per_s"] = round(result["train_examples"] / max(runtime, 1e-9), 2)
        train = {**recipe.train.model_dump(), **cells[index]}
        config = {key: train[key] for key in keys}
        if recipe.predict_test:
            best_run = Path(result["best"]).parent
            chosen = with_cell(recipe, cells[index], output_dir=str(best_run), seeds=[])
            result["test_predictions"] = str(predict_export(chosen, best_run))
    config["total_train_batch_size"] = result.get("total_train_batch_size")  # all processes (the report's bs)
    result.update(grid=summaries, chosen_index=index, config=config, protocol=protocol, init_from=init_from,
                  runtime_s=runtime)
    if cells != [{}] and launch_state().is_main_process:
        save_recipe(recipe, out)
        write_json(out / RESULTS, result)
    return result


# the GLUE score and its report (WNLI's majority class among them): report.py

__all__ = ["check_fixed", "entry_names", "majority_class", "parse_tasks", "plot_results", "results_markdown", "run_glue",
           "run_task", "summarise", "sweep_settings", "task_order", "task_recipe"]

"""Fine-tune several GLUE tasks from one base recipe and summarise them (``bert-recipes glue``).

For each task, the recipe is the base recipe, then the task's own file
``<base folder>/<task>.yaml`` when there is one (its keys, without its ``base:``), then the
command-line overrides; ``task`` is set and ``output_dir`` becomes ``<output_dir>/<task>``.
Every task recipe is validated (and its GLUE folder found) before any training starts.

Written into the base recipe's ``output_dir``:

- ``glue_results.json``: per task its dev metrics (mean and std with several seeds), its
  leaderboard entries, best export and run time; the GLUE score (the average of the
  entries of the tasks run: MNLI-m and MNLI-mm count as two, see
  :func:`~bert_recipes.glue.metrics.glue_score`);
- ``glue_results.md``: the same as a Markdown table, the GLUE score last;
- ``glue_results.png``: a bar chart of the entries and the score;
- with ``predict_test``: ``submission/submission.zip`` for gluebenchmark.com, with AX
  predicted by the MNLI model when MNLI is run and the AX data is available.
"""

from __future__ import annotations

import json
import logging
import os
import statistics
from pathlib import Path

from ..atomic import replacing, write_json, write_text
from ..errors import UserError
from ..recipe import validate
from ..recipe_files import apply_overrides, deep_merge, load_raw, read_yaml
from ..training.reporting import progress
from .data import glue_task_dir
from .finetune import finetune_seeds
from .metrics import glue_score, task_score
from .recipe import FinetuneRecipe
from .submission import write_submission
from .tasks import TASKS, get_task

logger = logging.getLogger("bert_recipes")

TRAINABLE = tuple(name for name, task in TASKS.items() if task.dev_splits)
RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "glue_results.json", "glue_results.md", "glue_results.png"


def parse_tasks(text: str | None) -> list[str]:
    """``"cola,SST-2,mnli"`` -> canonical names in the leaderboard's order (all 9 when empty).

    Raises:
        UserError: unknown or repeated task, or AX (it is predicted by the MNLI model).
    """
    if not text:
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
    return validate(FinetuneRecipe, raw, source)


def run_glue(base: str | os.PathLike, tasks: list[str], overrides: list[str] | None = None,
             predict_test: bool = False) -> dict | None:
    """Fine-tune ``tasks`` and write the results files (and the submission zip).

    Returns:
        The content of ``glue_results.json``.

    Raises:
        UserError: a bad recipe, an unknown task, missing data (checked before training).
        RunStopped: a run was stopped by a signal (its checkpoint resumes with
            ``resume_from=latest``; finished tasks are reused).
    """
    overrides = list(overrides or [])
    root_raw = apply_overrides(load_raw(base), overrides)
    root = Path(root_raw.get("output_dir") or FinetuneRecipe.model_fields["output_dir"].default)
    recipes = {name: task_recipe(base, name, overrides, root, predict_test) for name in tasks}
    for recipe in recipes.values():
        if recipe.data.glue_dir is not None:
            glue_task_dir(recipe.data.glue_dir, recipe.task)
    from accelerate import PartialState

    results = {}
    with progress(total=len(recipes), desc="GLUE tasks", main=PartialState().is_main_process) as bar:
        for name, recipe in recipes.items():
            bar.set_postfix_str(name)
            logger.info("GLUE %s -> %s", name, recipe.output_dir)
            results[name] = finetune_seeds(recipe)  # a stopped run raises RunStopped
            bar.update(1)
    summary = summarise(results)
    summary.update(recipe=str(base), output_dir=str(root))
    if PartialState().is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if predict_test:
            summary["submission"] = str(write_test_submission(results, root / "submission"))
        write_json(root / RESULTS_JSON, summary)
        write_text(root / RESULTS_MD, results_markdown(summary))
        plot_results(summary, root / RESULTS_PNG)
    PartialState().wait_for_everyone()
    return summary


# --------------------------------------------------------------------------- summary


def summarise(results: dict[str, dict]) -> dict:
    """Per task: metrics, std, leaderboard entries (with std over seeds); the GLUE score."""
    tasks = {}
    for name, result in results.items():
        task = get_task(name)
        entries = task_score(task, result["dev"])
        runs = list(result.get("runs", {}).values())
        per_seed = [task_score(task, r) for r in runs]
        std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed)] if per_seed else [0.0] * len(entries)
        tasks[name] = {
            "metrics": result["dev"],
            "std": result.get("dev_std", {}),
            "entries": dict(zip(entry_names(task), entries)),
            "entries_std": dict(zip(entry_names(task), std)),
            "main_metric": task.main_metric,
            "seeds": result.get("seeds", [result.get("seed")]),
            "best": result["best"],
            "runtime_s": result.get("runtime_s"),
        }
    score = glue_score({name: t["metrics"] for name, t in tasks.items()})
    return {"tasks": tasks, "glue_score": score, "num_entries": sum(len(t["entries"]) for t in tasks.values())}


def entry_names(task) -> list[str]:
    """Leaderboard column names of a task: ``["CoLA"]``, ``["MNLI-m", "MNLI-mm"]``."""
    return list(task.entry_names)


def _pct(value: float, std: float | None = None) -> str:
    text = f"{100 * value:.1f}"
    return f"{text} ± {100 * std:.1f}" if std is not None else text


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def results_markdown(summary: dict) -> str:
    """One row per task (dev metrics x 100, mean ± std over seeds), the GLUE score last."""
    lines = ["| task | dev metrics | score | seeds | time |", "|---|---|---|---|---|"]
    total = 0.0
    for name, row in summary["tasks"].items():
        task = get_task(name)
        several = len(row["seeds"]) > 1  # mean ± sample std over the seeds
        metrics = ", ".join(f"{key} {_pct(row['metrics'][key], row['std'].get(key) if several else None)}"
                            for key in task.metrics)
        score = " / ".join(_pct(v, row["entries_std"].get(k) if several else None) for k, v in row["entries"].items())
        total += row["runtime_s"] or 0.0
        lines.append(f"| {' / '.join(row['entries'])} | {metrics} | {score} | {len(row['seeds'])} | "
                     f"{_duration(row['runtime_s'])} |")
    lines.append(f"| **GLUE score** | average of {summary['num_entries']} entries | "
                 f"**{_pct(summary['glue_score'])}** | | {_duration(total)} |")
    return "\n".join(lines) + "\n"


def plot_results(summary: dict, path: Path) -> Path:
    """A bar per leaderboard entry and one for the GLUE score (x 100), written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values, errors = [], [], []
    for row in summary["tasks"].values():
        for key, value in row["entries"].items():
            names.append(key)
            values.append(100 * value)
            errors.append(100 * row["entries_std"].get(key, 0.0))
    names.append("GLUE")
    values.append(100 * summary["glue_score"])
    errors.append(0.0)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(names), 4.0))
    colors = ["tab:blue"] * (len(names) - 1) + ["tab:orange"]
    bars = ax.bar(names, values, yerr=errors if any(errors) else None, color=colors, capsize=3)
    ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], padding=2, fontsize=8)
    ax.set_ylabel("dev score (x 100)")
    ax.set_ylim(min(0.0, min(values) - 5), 105)
    ax.set_title("GLUE dev results")
    ax.tick_params(axis="x", labelrotation=45)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_test_submission(results: dict[str, dict], out_dir: Path) -> Path:
    """Merge the tasks' test predictions (and AX) into one leaderboard zip."""
    entries = {}
    for name, result in results.items():
        path = result.get("test_predictions")
        if not path:
            raise UserError(f"task '{name}' has no test predictions; run with --predict-test")
        for entry, values in json.loads(Path(path).read_text()).items():
            entries[entry] = (values["idx"], values["prediction"])
    return write_submission(entries, out_dir)


__all__ = ["entry_names", "parse_tasks", "plot_results", "results_markdown", "run_glue", "summarise", "task_recipe"]

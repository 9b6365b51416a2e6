"""GLUE fine-tuning over several seeds (``recipe.seeds``): one run per seed, mean and spread.

Each seed runs :func:`~bert_recipes.glue.finetune.finetune` into ``output_dir/seed-<s>``;
``output_dir/results.json`` gets every seed's dev metrics, their mean and sample standard
deviation, and the best seed, whose export and test predictions stand for the recipe.
"""

from __future__ import annotations

import statistics
from pathlib import Path

from ..atomic import write_json
from ..errors import UserError
from ..recipe import save_recipe
from ..training.accelerator import launch_state
from .finetune import finetune
from .metrics import comparable
from .recipe import FinetuneRecipe
from .reuse import RESULTS
from .tasks import GlueTask, get_task


def finetune_seeds(recipe: FinetuneRecipe, on_log=None) -> dict:
    """Run the recipe once per seed of ``recipe.seeds`` (one run with ``seed`` when empty).

    Each seed runs into ``output_dir/seed-<s>``; ``output_dir/results.json`` gets the dev
    metrics of every seed, their mean (``dev``) and sample standard deviation
    (``dev_std``), and the best seed by the task's main metric, whose export (``best``)
    and test predictions stand for the recipe.

    Raises:
        UserError: ``output_dir`` already holds results and neither resume nor overwrite is set.
        RunStopped: a seed's run was stopped by a signal.
    """
    if not recipe.seeds:
        return finetune(recipe, on_log)
    out = Path(recipe.output_dir)
    if (out / RESULTS).exists() and not (recipe.overwrite or recipe.resume_from):
        raise UserError(f"output_dir: '{out}' already holds a run ({RESULTS}); "
                        "set resume_from=latest to continue it, overwrite=true to replace it, or output_dir=DIR for a new run")
    runs = {seed: finetune(recipe.model_copy(update={"seed": seed, "seeds": [], "output_dir": str(out / f"seed-{seed}")}),
                           on_log)
            for seed in recipe.seeds}
    results = aggregate_seeds(get_task(recipe.task), runs)
    results["runtime_s"] = round(sum(r.get("runtime_s") or 0.0 for r in runs.values()), 1)  # all seeds
    results["train_examples"] = sum(int(r.get("train_examples") or 0) for r in runs.values())
    results["examples_per_s"] = round(results["train_examples"] / max(results["runtime_s"], 1e-9), 2)
    if launch_state().is_main_process:
        save_recipe(recipe, out)
        write_json(out / RESULTS, results)
    return results


def aggregate_seeds(task: GlueTask, runs: dict[int, dict]) -> dict:
    """Mean and sample standard deviation (0 for one seed) of the seeds' dev metrics."""
    keys = [key for key in task.metrics if all(key in r["dev"] for r in runs.values())]
    values = {key: [float(r["dev"][key]) for r in runs.values()] for key in keys}
    best_seed = max(runs, key=lambda s: comparable(runs[s]["dev"].get(task.main_metric)))
    return {
        "task": task.name,
        "seeds": list(runs),
        "dev": {key: statistics.fmean(v) for key, v in values.items()},
        "dev_std": {key: statistics.stdev(v) if len(v) > 1 else 0.0 for key, v in values.items()},
        "runs": {str(seed): r["dev"] for seed, r in runs.items()},
        "best_seed": best_seed,
        "best": runs[best_seed]["best"],
        "subsampled": runs[best_seed].get("subsampled"),
        "total_train_batch_size": runs[best_seed].get("total_train_batch_size"),
        "test_predictions": runs[best_seed].get("test_predictions"),
    }


__all__ = ["aggregate_seeds", "finetune_seeds"]

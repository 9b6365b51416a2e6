"""When a finished GLUE run's results stand for a recipe: ``resume_from`` on a run or a sweep
cell that already wrote its ``results.json``.

The recipe is compared with the run's saved ``recipe.yaml`` key by key. Keys that only say
where and how a run is written, logged or resumed (:data:`BOOKKEEPING`) do not count; a
changed schedule or set of seeds lets the run go on; anything else is refused in one line,
so that old results are never reported as a new recipe's.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..recipe_files import as_override, flatten, read_yaml
from ..training.resume import SCHEDULE_KEYS, same_value
from .evaluation import TEST_PREDICTIONS
from .recipe import FinetuneRecipe

#: A finished run's (or sweep cell's) results file.
RESULTS = "results.json"

#: Recipe keys whose change leaves a finished run's results standing: where and how a run is
#: written, logged, evaluated in batches or resumed, not what it trains or measures (``sweep.*``
#: too: a cell's own ``train`` values say what it trained).
BOOKKEEPING = frozenset({"output_dir", "overwrite", "resume_from", "report_to", "keep_host_memory", "predict_test",
                         "init_from_task", "train.logging_steps", "train.save_steps", "train.save_total_limit",
                         "train.max_consecutive_nonfinite_steps", "train.peak_flops", "train.per_device_eval_batch_size",
                         "train.reschedule_on_resume", "train.keep_final_checkpoint"})


def rebased(results: dict, out: Path) -> dict:
    """A finished run's ``results`` (from ``out/results.json``) with its ``best`` export and
    ``test_predictions`` paths in ``out``, where the run is now: they were written with the
    folder it trained in, so a copied or moved run (or sweep) pointed into the original and
    predicted there (found by a helper). A run's export is ``out/best``; a run of several seeds
    points into its ``best_seed``'s folder."""
    folder = out / f"seed-{results['best_seed']}" if results.get("best_seed") is not None else out
    results = {**results, "best": str(folder / "best")}
    if results.get("test_predictions"):
        results["test_predictions"] = str(folder / TEST_PREDICTIONS)
    return results


def finished_results(recipe: FinetuneRecipe, out: Path) -> dict | None:
    """With ``resume_from``, the results of the finished run in ``out`` when ``recipe`` asks for
    that same run; None when there is none, or when the run is to go on: a schedule key changed
    (``train.max_steps`` / ``num_train_epochs`` raised extend it; the others are checked by
    :func:`~bert_recipes.training.resume.check_resume`) or ``seeds`` changed (each seed's own
    run is reused or trained by :func:`~bert_recipes.glue.finetune.finetune_seeds`). The recipe
    is compared with the run's saved ``recipe.yaml``, key by key, but for :data:`BOOKKEEPING`.

    Raises:
        UserError: another key (the model, the data, the precision, a seed, an optimizer
            setting, ...) differs from the finished run's: its results are not this recipe's.
    """
    if not (recipe.resume_from and (out / RESULTS).is_file()):
        return None
    results = rebased(json.loads((out / RESULTS).read_text()), out)
    if not (out / "recipe.yaml").is_file():
        return results
    saved, now = flatten(read_yaml(out / "recipe.yaml") or {}), flatten(recipe.model_dump(mode="json"))
    # with train.global_batch_size the accumulation is derived at launch (saved resolved): the batch is what counts
    derived = {"train.gradient_accumulation_steps"} if now.get("train.global_batch_size") is not None else set()
    changed = [key for key in dict.fromkeys([*saved, *now]) if key not in BOOKKEEPING and not key.startswith("sweep.")
               and key not in derived and not same_value(key, saved.get(key), now.get(key), out)]
    goes_on = {f"train.{key}" for key in SCHEDULE_KEYS} | {"seeds"}
    other = [key for key in changed if key not in goes_on]
    if other:
        key = other[0]
        retrain = ("remove resume_from to retrain it (overwrite=true is set; resume_from reuses a finished run)"
                   if recipe.overwrite else "or overwrite=true to retrain it")
        raise UserError(f"{key}: {now.get(key)} differs from {saved.get(key)} of the finished run in '{out}', whose "
                        f"results would be reused as this recipe's: set {key}={as_override(saved.get(key))} to reuse them, "
                        f"output_dir=DIR for a new run, {retrain}")
    return None if changed else results

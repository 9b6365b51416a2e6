"""Hyper-parameter grids of ``bert-recipes glue``: cell names, statistics over seeds, the
choice of a cell on dev, the fixed protocol's one-configuration check, the time estimate and
the grid heatmap.

A cell is ``{train key: value}`` (see :class:`~bert_recipes.glue.recipe.SweepConfig`); its
runs live in ``<output_dir>/<task>/<cell name>/seed-<s>`` and its ``results.json`` (written
atomically when all its seeds are done) marks it finished.
"""

from __future__ import annotations

import logging
import math
import statistics
from pathlib import Path

from ..atomic import replacing
from ..errors import UserError
from .metrics import comparable
from .metrics import task_score
from .recipe import FinetuneRecipe, FinetuneTrainConfig
from .tasks import GlueTask

logger = logging.getLogger("bert_recipes")

SHORT = {"learning_rate": "lr", "per_device_train_batch_size": "bs", "num_train_epochs": "ep", "max_steps": "steps",
         "warmup_ratio": "warmup", "weight_decay": "wd", "early_stopping_patience": "patience"}
GRID_PNG = "glue_grid.png"


def with_cell(recipe: FinetuneRecipe, cell: dict, **update) -> FinetuneRecipe:
    """``recipe`` with a grid cell's ``train`` values (and ``update``'s top-level keys)."""
    train = FinetuneTrainConfig.model_validate({**recipe.train.model_dump(), **cell})
    return recipe.model_copy(update={"train": train, **update})


def cell_name(cell: dict) -> str:
    """A folder name for a cell: ``{"learning_rate": 5e-05, "num_train_epochs": 3}`` ->
    ``"lr5e-05_ep3"``; ``"default"`` for the empty cell."""
    if not cell:
        return "default"
    return "_".join(f"{SHORT.get(key, key)}{_short_value(value)}" for key, value in cell.items())


def _short_value(value) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    return str(value)


def seed_stats(values: list[float]) -> dict:
    """``{"mean", "median", "std", "min", "max", "n"}`` of per-seed values (sample std, 0 for
    one value). nan values make every statistic nan.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("seed_stats: no values")
    values = [float(v) for v in values]
    if any(not math.isfinite(v) for v in values):
        nan = float("nan")
        return {"mean": nan, "median": nan, "std": nan, "min": nan, "max": nan, "n": len(values)}
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def per_seed_scores(task: GlueTask, result: dict) -> list[list[float]]:
    """The leaderboard entries of every seed of a cell: ``[[entry per seed] per entry]``."""
    runs = list(result.get("runs", {}).values()) or [result["dev"]]
    per_seed = [task_score(task, r) for r in runs]
    return [list(values) for values in zip(*per_seed)]


def cell_summary(task: GlueTask, cell: dict, result: dict) -> dict:
    """One grid cell for the report: its values, the main metric's statistics over seeds,
    each entry's statistics, wall seconds and training examples per second."""
    runs = list(result.get("runs", {}).values()) or [result["dev"]]
    main = [float(r.get(task.main_metric, float("nan"))) for r in runs]
    entries = per_seed_scores(task, result)
    return {
        "name": cell_name(cell),
        "cell": cell,
        "main_metric": task.main_metric,
        "main": seed_stats(main),
        "entries": {name: seed_stats(values) for name, values in zip(task.entry_names, entries)},
        "seeds": result.get("seeds", [result.get("seed")]),
        "runtime_s": result.get("runtime_s"),
        "train_examples": result.get("train_examples"),
        "examples_per_s": result.get("examples_per_s"),
    }


def choose(cells: list[dict]) -> int:
    """Index of the cell with the best mean main metric over seeds (the first on ties; nan
    ranks last). ``cells`` are :func:`cell_summary` dicts.

    Raises:
        ValueError: no cells.
    """
    if not cells:
        raise ValueError("choose: no cells")
    best = 0
    for index, cell in enumerate(cells):
        if comparable(cell["main"]["mean"]) > comparable(cells[best]["main"]["mean"]):
            best = index
    return best


class SweepClock:
    """The whole sweep's time estimate from the first logging steps of the first run.

    ``total_examples``: the training examples of every run of the sweep (cells x seeds x
    epochs x train size); the estimate is ``total_examples / rate`` with the rate measured
    once ``min_seconds`` of training have been logged (evaluation and loading not counted).
    The estimate is printed once, to stdout and the log, so a user can stop the sweep.
    """

    def __init__(self, total_examples: float, runs: int, min_seconds: float = 2.0, printer=print):
        self.total_examples, self.runs, self.min_seconds, self.printer = total_examples, runs, min_seconds, printer
        self.examples = self.seconds = 0.0
        self.estimate_s: float | None = None

    def __call__(self, step: int, examples: float, seconds: float) -> None:
        if self.estimate_s is not None:
            return
        self.examples += examples
        self.seconds += seconds
        if self.seconds < self.min_seconds and step > 1 and self.examples < self.total_examples:
            return
        rate = self.examples / max(self.seconds, 1e-9)
        self.estimate_s = self.total_examples / max(rate, 1e-9)
        text = (f"sweep estimate: about {format_duration(self.estimate_s)} of training for {self.runs} run(s) "
                f"({self.total_examples:,.0f} training examples at {rate:,.1f} examples/s, measured on the first "
                f"{self.seconds:.1f}s; evaluation and loading come on top). Ctrl-C stops it; resume_from=latest "
                "continues cell by cell.")
        self.printer(text, flush=True)  # stdout, the main process only (not the log too: printed once)


def format_duration(seconds) -> str:
    """``75.2`` -> ``"1m 15s"``, ``7300`` -> ``"2h 01m"``; ``"-"`` for None."""
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def plot_grid(tasks: dict[str, dict], path: Path) -> Path | None:
    """A heatmap per task of its grid cells' mean dev main metric (x 100), rows the first
    grid key's values, columns the other keys' combinations; the chosen cell framed.
    Nothing is written (None) when no task has more than one cell."""
    rows = {name: row for name, row in tasks.items() if len(row.get("grid", [])) > 1}
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.patches import Rectangle

    fig, axes = plt.subplots(len(rows), 1, figsize=(7.0, 2.2 + 1.6 * len(rows)), squeeze=False)
    for ax, (name, row) in zip(axes[:, 0], rows.items()):
        cells = row["grid"]
        keys = list(cells[0]["cell"])
        first = keys[0]
        ys = list(dict.fromkeys(c["cell"][first] for c in cells))
        rest = lambda c: ", ".join(f"{SHORT.get(k, k)} {c['cell'][k]}" for k in keys[1:]) or "-"  # noqa: E731
        xs = list(dict.fromkeys(rest(c) for c in cells))
        grid = np.full((len(ys), len(xs)), np.nan)
        chosen = None
        for index, c in enumerate(cells):
            i, j = ys.index(c["cell"][first]), xs.index(rest(c))
            grid[i, j] = 100 * c["main"]["mean"]
            if index == row["chosen_index"]:
                chosen = (i, j)
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.1f}", ha="center", va="center", color="w", fontsize=8)
        if chosen is not None:
            ax.add_patch(Rectangle((chosen[1] - 0.5, chosen[0] - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2))
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xticks(range(len(xs)), xs, fontsize=7)
        ax.set_ylabel(SHORT.get(first, first))
        ax.set_title(f"{name}: dev {row['main_metric']} (x 100, mean over seeds); chosen framed", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path



# train keys that change how a run is logged or saved, not what it learns: free per task under the fixed protocol
BOOKKEEPING = ("logging_steps", "save_steps", "save_total_limit", "keep_final_checkpoint", "per_device_eval_batch_size")


def check_fixed(recipes: dict[str, FinetuneRecipe], cells: dict[str, list[dict]]) -> None:
    """The fixed protocol: one configuration, the same for every task (the :data:`BOOKKEEPING`
    keys aside, so the shipped per-task files, SST-2's logging cadence say, pass).

    Raises:
        UserError: a grid with several cells, or tasks with different ``train`` sections.
    """
    first = None
    for name, recipe in recipes.items():
        if len(cells[name]) > 1:
            raise UserError(f"sweep.protocol=fixed runs one configuration, but {name}'s sweep.grid has "
                            f"{len(cells[name])} cells; remove the grid or use sweep.protocol=select")
        train = {key: value for key, value in {**recipe.train.model_dump(), **cells[name][0]}.items()
                 if key not in BOOKKEEPING}
        if first is None:
            first = (name, train)
        elif train != first[1]:
            diff = sorted(k for k in train if train[k] != first[1][k])
            shown = ", ".join(f"train.{k} {first[1][k]} vs {train[k]}" for k in diff[:3])
            raise UserError(f"sweep.protocol=fixed uses one configuration for every task, but {first[0]} and {name} "
                            f"differ ({shown}); remove the per-task train keys or use sweep.protocol=select")


__all__ = ["BOOKKEEPING", "SweepClock", "cell_name", "cell_summary", "check_fixed", "choose", "format_duration",
           "per_seed_scores", "plot_grid", "seed_stats", "with_cell"]

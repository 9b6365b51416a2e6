"""The GLUE sweep's report: per-task summaries, the GLUE score (and which entries it
averages, WNLI included, left out or answered with the majority class), the markdown
table, the bar chart and the leaderboard files of ``bert-recipes glue``."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ..atomic import replacing, write_json
from ..errors import UserError
from .evaluation import TEST_PREDICTIONS
from .grid import format_duration, seed_stats
from .metrics import glue_score, task_score
from .recipe import FinetuneRecipe
from .submission import write_submission
from .tasks import get_task

logger = logging.getLogger("bert_recipes")

#: A sweep's report files in its output folder (``bert-recipes glue``).
RESULTS_JSON, RESULTS_MD, RESULTS_PNG = "glue_results.json", "glue_results.md", "glue_results.png"


def majority_class(recipe: FinetuneRecipe, out: Path, predict_test: bool) -> dict:
    """WNLI answered with the training set's majority class (the BERT paper's choice): its
    dev accuracy, and with ``predict_test`` that class for every test example."""
    from collections import Counter

    from .data import load_glue_split
    from .tasks import submission_entry

    task = get_task("wnli")
    labels = list(load_glue_split(task, "train", recipe.data.glue_dir)["label"])
    majority = min(Counter(labels).items(), key=lambda item: (-item[1], item[0]))[0]  # ties: the lower id
    dev = list(load_glue_split(task, task.dev_splits[0], recipe.data.glue_dir)["label"])
    result = {"task": "wnli", "dev": {"accuracy": sum(label == majority for label in dev) / len(dev)},
              "majority_class": task.id2label[majority], "seeds": [], "best": None, "runtime_s": 0.0,
              "protocol": "majority", "config": {}, "grid": [], "test_predictions": None}
    if predict_test:
        test = load_glue_split(task, "test", recipe.data.glue_dir)
        out.mkdir(parents=True, exist_ok=True)
        path = write_json(out / TEST_PREDICTIONS, {submission_entry(task, "test"): {
            "idx": list(test["idx"]), "prediction": [majority] * len(test)}})
        result["test_predictions"] = str(path)
    return result


# --------------------------------------------------------------------------- summary


def summarise(results: dict[str, dict], protocol: str = "select", wnli: str | None = None) -> dict:
    """Per task: metrics (mean over seeds), std and median, leaderboard entries, the chosen
    configuration, its grid; the GLUE score and which entries it averages.

    ``wnli``: ``include``, ``exclude`` (WNLI is in no row and not averaged) or ``majority``
    (its row is the majority class; averaged), None when WNLI was not asked for.
    """
    tasks = {}
    for name, result in results.items():
        task = get_task(name)
        entries = task_score(task, result["dev"])
        runs = list(result.get("runs", {}).values())
        per_seed = [task_score(task, r) for r in runs] or [entries]
        stats = [seed_stats(list(v)) for v in zip(*per_seed)]
        tasks[name] = {
            "metrics": result["dev"],
            "std": result.get("dev_std", {}),
            "entries": dict(zip(entry_names(task), entries)),
            "entries_std": dict(zip(entry_names(task), (s["std"] for s in stats))),
            "entries_median": dict(zip(entry_names(task), (s["median"] for s in stats))),
            "main_metric": task.main_metric,
            "seeds": result.get("seeds", [result.get("seed")]),
            "best": result["best"],
            "runtime_s": result.get("runtime_s"),
            "train_examples": result.get("train_examples"),
            "examples_per_s": result.get("examples_per_s"),
            "config": result.get("config", {}),
            "init_from": result.get("init_from"),
            "protocol": result.get("protocol", protocol),
            "grid": result.get("grid", []),
            "chosen_index": result.get("chosen_index", 0),
        }
        if "majority_class" in result:
            tasks[name]["majority_class"] = result["majority_class"]
    score = glue_score({name: t["metrics"] for name, t in tasks.items()})
    averaged = [entry for row in tasks.values() for entry in row["entries"]]
    return {"tasks": tasks, "glue_score": score, "num_entries": len(averaged), "score_entries": averaged,
            "wnli": wnli, "protocol": protocol}


def entry_names(task) -> list[str]:
    """Leaderboard column names of a task: ``["CoLA"]``, ``["MNLI-m", "MNLI-mm"]``."""
    return list(task.entry_names)


def _pct(value: float, std: float | None = None) -> str:
    text = f"{100 * value:.1f}"
    return f"{text} ± {100 * std:.1f}" if std is not None else text


_duration = format_duration


def _config(row: dict) -> str:
    if "majority_class" in row:
        return f"majority class ({row['majority_class']}), no training"
    c = row.get("config") or {}
    parts = []
    if c.get("learning_rate") is not None:
        parts.append(f"lr {c['learning_rate']:g}")
    per_device, total = c.get("per_device_train_batch_size"), c.get("total_train_batch_size")
    if total and total != per_device:  # several processes or accumulation: the optimizer's batch (found by a helper)
        parts.append(f"bs {total} ({per_device} per device)")
    elif per_device is not None:
        parts.append(f"bs {per_device}")
    if c.get("max_steps"):
        parts.append(f"{c['max_steps']} steps")
    elif c.get("num_train_epochs") is not None:
        parts.append(f"{c['num_train_epochs']:g} ep")
    text = ", ".join(parts) or "-"
    if len(row.get("grid", [])) > 1:
        text += f" (best of {len(row['grid'])} cells)" if row.get("protocol") == "select" else ""
    if row.get("init_from"):
        text += f", from {row['init_from']}"
    return text


def protocol_text(summary: dict) -> str:
    """One sentence: which protocol produced the table."""
    seeds = sorted({len(row["seeds"]) for row in summary["tasks"].values() if row["seeds"]})
    seeds_text = "/".join(map(str, seeds)) or "1"
    if summary.get("protocol") == "fixed":
        return (f"Protocol: fixed (one configuration for every task, mean of {seeds_text} seed(s), no selection on "
                "dev; test predictions from the best seed).")
    cells = sorted({max(1, len(row["grid"])) for row in summary["tasks"].values() if "majority_class" not in row})
    if cells in ([], [1]):
        return f"Protocol: select over one configuration per task (no grid), mean of {seeds_text} seed(s)."
    return (f"Protocol: select (per task, the grid cell with the best dev main metric averaged over {seeds_text} "
            f"seed(s), out of {'/'.join(map(str, cells))} cells; test predictions from that cell's best seed).")


def score_text(summary: dict) -> str:
    """What the GLUE score averages, and what was done with WNLI."""
    count = summary["num_entries"]
    text = f"average of {count} {'entry' if count == 1 else 'entries'} ({', '.join(summary['score_entries'])})"
    if summary.get("wnli") == "exclude":
        text += "; WNLI left out"
    elif summary.get("wnli") == "majority":
        text += "; WNLI = majority class"
    return text


def subsampled(data) -> dict:
    """``data.max_train_samples`` / ``data.max_eval_samples`` of a recipe's ``data`` (or None), where set."""
    return {key: getattr(data, key) for key in ("max_train_samples", "max_eval_samples") if getattr(data, key, None)}


def what_cut(results: dict, data) -> dict:
    """The ``max_train_samples`` / ``max_eval_samples`` that cut some task's split (each run's
    ``results.json`` ``subsampled``); for results written before runs recorded it, the first
    task's recipe ``data`` values (sizes given on the command line apply to every task)."""
    cuts = [result.get("subsampled") for result in results.values() if "majority_class" not in result]
    if any(cut is None for cut in cuts):
        return subsampled(data)
    return {key: value for cut in cuts for key, value in cut.items()}


def subsampled_text(subsampled: dict, scope: str = " per task", mark: str = "**") -> str:
    """One sentence for a sweep (or, ``scope=""``, one run) on part of the data
    (``data.max_train_samples`` / ``data.max_eval_samples``): its scores are not GLUE's."""
    parts = []
    if subsampled.get("max_train_samples"):
        parts.append(f"trained on at most {subsampled['max_train_samples']} examples{scope} (data.max_train_samples)")
    if subsampled.get("max_eval_samples"):
        parts.append(f"dev metrics on at most the first {subsampled['max_eval_samples']} dev examples{scope} "
                     "(data.max_eval_samples)")
    return f"{mark}Part of the data{mark}: " + "; ".join(parts) + ": not comparable with full GLUE results."


def results_markdown(summary: dict) -> str:
    """One row per task (dev metrics x 100, mean ± std and median over seeds, the chosen
    configuration, time of all its cells and training examples per second), the GLUE score
    last; the protocol; then every grid cell of the tasks that have a grid."""
    lines = ["| task | configuration | dev metrics | score | median | seeds | time | examples/s |",
             "|---|---|---|---|---|---|---|---|"]
    total = 0.0
    for name, row in summary["tasks"].items():
        task = get_task(name)
        several = len(row["seeds"]) > 1  # mean ± sample std over the seeds
        metrics = ", ".join(f"{key} {_pct(row['metrics'][key], row['std'].get(key) if several else None)}"
                            for key in task.metrics if key in row["metrics"])
        score = " / ".join(_pct(v, row["entries_std"].get(k) if several else None) for k, v in row["entries"].items())
        median = " / ".join(_pct(v) for v in row.get("entries_median", row["entries"]).values())
        total += row["runtime_s"] or 0.0
        rate = f"{row['examples_per_s']:.1f}" if row.get("examples_per_s") else "-"
        lines.append(f"| {' / '.join(row['entries'])} | {_config(row)} | {metrics} | {score} | {median} | "
                     f"{len(row['seeds'])} | {_duration(row['runtime_s'])} | {rate} |")
    lines.append(f"| **GLUE score** | | {score_text(summary)} | **{_pct(summary['glue_score'])}** | | | "
                 f"{_duration(total)} | |")
    lines += ["", protocol_text(summary)]
    if summary.get("subsampled"):
        lines.append(subsampled_text(summary["subsampled"]))
    if summary.get("estimate_s") is not None:
        lines.append(f"Estimated training time before the start: {_duration(summary['estimate_s'])}.")
    for name, row in summary["tasks"].items():
        if len(row.get("grid", [])) <= 1:
            continue
        lines += ["", f"### {' / '.join(row['entries'])}: every cell (dev {row['main_metric']} x 100 over seeds)", "",
                  "| cell | mean | median | std | min | max | seeds | time | examples/s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for index, cell in enumerate(row["grid"]):
            m = cell["main"]
            chosen = " **chosen**" if index == row["chosen_index"] else ""
            rate = f"{cell['examples_per_s']:.1f}" if cell.get("examples_per_s") else "-"
            lines.append(f"| {cell['name']}{chosen} | {_pct(m['mean'])} | {_pct(m['median'])} | {_pct(m['std'])} | "
                         f"{_pct(m['min'])} | {_pct(m['max'])} | {m['n']} | {_duration(cell['runtime_s'])} | {rate} |")
    if summary.get("grid_png"):
        lines += ["", f"Heatmap: {Path(summary['grid_png']).name}"]
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


__all__ = ["RESULTS_JSON", "RESULTS_MD", "RESULTS_PNG", "entry_names", "majority_class", "plot_results",
           "results_markdown", "score_text", "subsampled", "subsampled_text", "summarise", "what_cut",
           "write_test_submission"]

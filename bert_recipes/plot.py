"""``bert-recipes plot RUN_DIR [--out DIR]``: PNG training curves from ``RUN_DIR/metrics.jsonl``.

One figure per group of keys that the run logged, so the same command serves pretraining
(loss / mlm_loss / nsp_loss, MLM and NSP accuracy, perplexity, ...) and GLUE fine-tuning
(loss, eval_accuracy / eval_f1 / eval_matthews_correlation, ...). Training values are
lines; evaluation values (``eval_*``) are lines with markers. Written with matplotlib's
non-interactive Agg backend, so it works on a headless machine.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from .errors import UserError

logger = logging.getLogger("bert_recipes")

# Logged alongside evaluations but not quality metrics.
EVAL_BOOKKEEPING = {"eval_sequences", "eval_samples", "eval_runtime_s", "eval_perplexity"}


def _base(key: str) -> str:
    return key.removeprefix("eval_")


# (file stem, title, y label, which keys, log-scale y)
GROUPS = [
    ("loss", "Loss", "loss (nats)", lambda k: _base(k).endswith("loss"), False),
    ("accuracy", "Accuracy", "accuracy", lambda k: "accuracy" in k, False),
    ("eval_metrics", "Evaluation metrics", "value",
     lambda k: k.startswith("eval_") and k not in EVAL_BOOKKEEPING and not k.endswith("loss") and "accuracy" not in k, False),
    ("perplexity", "Evaluation perplexity", "perplexity", lambda k: k == "eval_perplexity", True),
    ("lr", "Learning rate", "learning rate", lambda k: k == "lr", False),
    ("throughput", "Throughput", "tokens / s", lambda k: k == "tokens_per_s", False),
    ("grad_norm", "Gradient norm (before clipping)", "global L2 norm", lambda k: k == "grad_norm", True),
    ("mfu", "Model FLOPs utilisation", "MFU", lambda k: k == "mfu", False),
]


def _number(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf"):
        return float(value)  # metrics.jsonl writes non-finite floats as strings
    return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``; malformed lines (a killed run's last) are skipped.

    Raises:
        UserError: the file is missing or holds no record with a step.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not Path(run_dir).is_dir():
        raise UserError(f"{run_dir}: run directory not found")
    if not path.is_file():
        raise UserError(f"{path}: not found; expected the metrics.jsonl of a bert-recipes run")
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
        else:
            bad += 1
    if bad:
        logger.warning("%s: skipped %d malformed line(s)", path, bad)
    if not records:
        raise UserError(f"{path}: no metrics logged yet (the file is empty)")
    return records


def series(records: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """``{key: (steps, values)}`` for every numeric key; a step logged twice (resume) keeps the last value."""
    by_key: dict[str, dict[int, float]] = {}
    for record in records:
        for key, value in record.items():
            number = _number(value)
            if key != "step" and number is not None:
                by_key.setdefault(key, {})[record["step"]] = number
    return {key: (sorted(points), [points[s] for s in sorted(points)]) for key, points in by_key.items()}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per group of logged keys; return the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = series(read_metrics(run_dir))
    out = Path(out_dir) if out_dir else Path(run_dir) / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, title, ylabel, wanted, log_y in GROUPS:
        keys = sorted((k for k in data if wanted(k)), key=lambda k: (k.startswith("eval_"), k))
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
        colors = {base: f"C{i}" for i, base in enumerate(dict.fromkeys(_base(k) for k in keys))}
        for key in keys:  # an eval curve takes its training twin's colour, dashed with markers
            steps, values = data[key]
            style = dict(marker="o", markersize=4, linestyle="--") if key.startswith("eval_") else {}
            if len(steps) == 1:
                style.setdefault("marker", "o")
            ax.plot(steps, values, label=key, color=colors[_base(key)], **style)
        if log_y and all(v > 0 for k in keys for v in data[k][1] if math.isfinite(v)):
            ax.set_yscale("log")
        ax.set(title=f"{title} - {Path(run_dir).resolve().name}", xlabel="optimizer step", ylabel=ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        fig.tight_layout()
        target = out / f"{stem}.png"
        fig.savefig(target)
        plt.close(fig)
        written.append(target)
    if not written:
        raise UserError(f"{Path(run_dir) / 'metrics.jsonl'}: no plottable metrics (expected keys like loss, lr, eval_*)")
    return written


def cmd_plot(args) -> int:
    for path in plot_run(args.run_dir, args.out):
        print(path)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's metrics.jsonl as PNG curves")
    p.add_argument("run_dir", help="a run directory (holds metrics.jsonl)")
    p.add_argument("--out", default=None, help="output folder (default RUN_DIR/plots)")
    p.set_defaults(handler=cmd_plot)

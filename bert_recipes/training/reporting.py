"""Metrics JSONL, Accelerate trackers, progress bar and the end-of-run summary.

Only the main process writes or prints. ``metrics.jsonl`` always gets one JSON object per
logged step or evaluation; trackers (TensorBoard, trackio, W&B) are Accelerate's and are
chosen by the recipe's ``report_to``. The progress bar is tqdm on a terminal; when stderr is
not a terminal (CI, a log file), plain log lines are printed instead.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

TRACKERS = {"tensorboard", "trackio", "wandb"}


def trackers_for(report_to: list[str]) -> list[str]:
    """The Accelerate ``log_with`` names among ``report_to`` (``jsonl`` is always on)."""
    return [name for name in report_to if name in TRACKERS]


def interactive(main: bool = True) -> bool:
    """Whether progress bars are drawn: on the main process, when stderr is a terminal."""
    return main and sys.stderr.isatty()


def progress(iterable=None, *, total: int | None = None, desc: str, main: bool = True, leave: bool = True,
             initial: int = 0):
    """A tqdm progress bar (with ETA) over ``iterable``, drawn only where :func:`interactive`.

    Elsewhere (other ranks, CI logs, pipes) the bar is disabled and the iterable is returned
    as a plain pass-through, so no carriage-return noise reaches log files.

    Args:
        iterable: what to iterate over (None for a manual bar driven by ``update``).
        total: the number of items, when ``iterable`` has no ``len`` (None: no ETA).
        desc: the bar's label, e.g. ``"eval"``.
        main: whether this process is the main one.
        leave: keep the finished bar on screen (False for inner bars such as evaluation).
        initial: the count already done (a resumed run).
    """
    return tqdm(iterable, total=total, initial=initial, desc=desc, dynamic_ncols=True, leave=leave,
                disable=not interactive(main))


def _clean(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf
    return value


class Reporter:
    """Writes metrics to ``output_dir/metrics.jsonl``, trackers and the console.

    Args:
        accelerator: the run's ``Accelerator`` (trackers already initialised).
        output_dir: the run directory.
        total_steps: for the progress bar.
        initial_step: where a resumed run starts.
        desc: progress-bar label.
    """

    def __init__(self, accelerator, output_dir: str | Path, total_steps: int, initial_step: int = 0, desc: str = "train"):
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.path = Path(output_dir) / "metrics.jsonl"
        if self.main:
            truncate_metrics(self.path, initial_step)
        self.interactive = interactive(self.main)
        self.bar = progress(total=total_steps, initial=initial_step, desc=desc, main=self.main)
        self.history: list[dict] = []
        self.started = time.time()

    def log(self, record: dict, step: int) -> None:
        """Append ``record`` (with ``step``) to metrics.jsonl, trackers and the console."""
        record = {"step": step, **{k: _clean(v) for k, v in record.items()}}
        self.history.append(record)
        if not self.main:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        self.accelerator.log(numeric, step=step)
        self.write(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()))

    def advance(self, n: int = 1, **postfix) -> None:
        if self.interactive:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def write(self, line: str) -> None:
        """Print a line on the main process without breaking the progress bar."""
        if not self.main:
            return
        if self.interactive:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self.bar.close()

    def summary(self, extra: dict | None = None) -> str:
        """A short table of the last train and eval values, printed at the end of a run."""
        last_train = next((r for r in reversed(self.history) if "loss" in r), {})
        last_eval = next((r for r in reversed(self.history) if any(k.startswith("eval_") for k in r)), {})
        rows = {**{k: v for k, v in last_train.items() if k != "step"}, **{k: v for k, v in last_eval.items() if k != "step"}}
        rows.update(extra or {})
        rows["wall_time_s"] = round(time.time() - self.started, 1)
        width = max((len(k) for k in rows), default=0)
        lines = ["-" * (width + 16), *(f"{k:<{width}}  {_fmt(v)}" for k, v in rows.items()), "-" * (width + 16)]
        return "\n".join(lines)


def truncate_metrics(path: Path, step: int) -> int:
    """Drop the records of ``path`` (a metrics.jsonl) logged after ``step``, atomically.

    A resumed run restarts at its checkpoint's step: the steps a killed run logged after
    that checkpoint are logged again, so the file keeps each step once. Unreadable lines
    (a killed run's half-written last line) are dropped too. Returns the number of lines dropped.
    """
    from ..atomic import write_text

    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            keep = isinstance(record, dict) and int(record.get("step", 0)) <= step
        except (ValueError, TypeError):
            keep = False
        if keep:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        write_text(path, "".join(line + "\n" for line in kept))
    return dropped


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"  # tokens_per_s=3338.4, loss=8.2041
    return str(value)

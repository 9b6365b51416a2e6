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


__all__ = ["FAST_BF16_CPU_FLAGS", "cpu_flags", "describe_device", "resolve_precision"]

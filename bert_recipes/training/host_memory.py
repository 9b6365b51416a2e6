"""``keep_host_memory``: a CPU run keeps the memory it frees for its next step.

A training step on a CPU allocates and frees the same large tensors every step (activations,
attention scores, logits, gradients). glibc's malloc serves each allocation above its mmap
threshold (128 KiB, raised as such blocks are freed, at most 32 MiB) with a fresh ``mmap``
and returns it to the kernel on free, so the next step faults every page of it in again:
at BERT-base, sequence 512, batch 4 in fp32 on this project's CPU, 560,000 page faults per
3-step round against 25,000 with this setting, 1.10x faster (``benchmarks/packing.py --ab
host-memory``). jemalloc or tcmalloc with decay off,
which ``python -m torch.backends.xeon.run_cpu`` preloads, avoid this; glibc's own tunables
do the same, which :func:`keep_freed_memory` sets with ``mallopt``: ``M_MMAP_MAX = 0``
(every block from the heap) and ``M_TRIM_THRESHOLD`` at its maximum (freed memory stays
with the process for reuse). The cost: the process keeps its peak host memory until it
exits, as PyTorch's CUDA caching allocator keeps GPU memory.

Not applied off Linux with glibc, where ``LD_PRELOAD`` names another allocator, or where the
environment already tunes glibc's malloc (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``,
``MALLOC_MMAP_THRESHOLD_``, or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``): the user's choice
stands.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

#: ``mallopt`` parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: The largest value ``mallopt`` takes (a C int): 2 GiB - 1.
TRIM_THRESHOLD = 2**31 - 1
#: Environment variables that already tune glibc's malloc (and ``glibc.malloc.*`` in ``GLIBC_TUNABLES``).
MALLOC_ENV = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def allocator_settings(environ) -> list[str]:
    """The environment variables in ``environ`` that choose or tune the host allocator:
    ``LD_PRELOAD`` naming another allocator, glibc's ``MALLOC_*_``, ``GLIBC_TUNABLES`` with
    ``glibc.malloc.*``."""
    found = ["LD_PRELOAD"] if any(name in environ.get("LD_PRELOAD", "") for name in OTHER_ALLOCATORS) else []
    found += [name for name in MALLOC_ENV if name in environ]
    if "glibc.malloc." in environ.get("GLIBC_TUNABLES", ""):
        found.append("GLIBC_TUNABLES")
    return found


def without_allocator_settings(environ) -> dict:
    """A copy of ``environ`` without :func:`allocator_settings` (and any other ``MALLOC_``
    variable): a child process then starts on glibc's defaults."""
    chosen = set(allocator_settings(environ))
    return {k: v for k, v in environ.items() if k not in chosen and not k.startswith("MALLOC_")}


def keep_freed_memory(environ=None, system: str | None = None, libc=None) -> str:
    """Tell glibc's malloc to keep freed memory in this process (see the module docstring).

    Args:
        environ, system, libc: the environment, ``platform.system()`` and the C library
            (default: this process's; for tests).

    Returns:
        A line for the log: what was set, or why nothing was.
    """
    environ = os.environ if environ is None else environ
    system = platform.system() if system is None else system
    chosen = allocator_settings(environ)
    if system != "Linux":
        return f"kept by the system allocator's own rules ({system}: no glibc tunables)"
    if "LD_PRELOAD" in chosen:
        preloaded = next(name for name in OTHER_ALLOCATORS if name in environ["LD_PRELOAD"])
        return f"managed by the preloaded {preloaded} (LD_PRELOAD)"
    if chosen:
        return f"glibc malloc as the environment sets it ({', '.join(chosen)})"
    if libc is None:
        if platform.libc_ver()[0] != "glibc":
            return "not glibc: the C library's own rules"
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None or not (mallopt(M_MMAP_MAX, 0) and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)):
        return "glibc malloc unchanged (mallopt refused)"
    return "kept for reuse (glibc malloc: M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB; keep_host_memory: false to release)"

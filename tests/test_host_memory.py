"""``keep_host_memory`` (bert_recipes/training/host_memory.py): when it tunes glibc's malloc,
and that the tuning does what it is for: a freed large tensor's pages are reused, not faulted
in again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bert_recipes.recipe import RunConfig
from bert_recipes.training.host_memory import (M_MMAP_MAX, M_TRIM_THRESHOLD, TRIM_THRESHOLD, keep_freed_memory,
                                               without_allocator_settings)


class FakeLibc:
    def __init__(self, accepts: bool = True):
        self.calls, self.accepts = [], accepts

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return int(self.accepts)


def test_it_sets_glibc_to_keep_freed_memory():
    libc = FakeLibc()
    line = keep_freed_memory(environ={}, system="Linux", libc=libc)
    assert libc.calls == [(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, TRIM_THRESHOLD)]
    assert TRIM_THRESHOLD == 2**31 - 1  # mallopt's value is a C int
    assert line.startswith("kept for reuse")
    assert keep_freed_memory(environ={}, system="Linux", libc=FakeLibc(accepts=False)) == "glibc malloc unchanged (mallopt refused)"
    assert RunConfig().keep_host_memory is True


@pytest.mark.parametrize("environ, system, expected", [
    ({"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}, "Linux", "managed by the preloaded jemalloc (LD_PRELOAD)"),
    ({"LD_PRELOAD": "libtcmalloc.so"}, "Linux", "managed by the preloaded tcmalloc (LD_PRELOAD)"),
    ({"MALLOC_TRIM_THRESHOLD_": "0"}, "Linux", "glibc malloc as the environment sets it (MALLOC_TRIM_THRESHOLD_)"),
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"}, "Linux", "glibc malloc as the environment sets it (GLIBC_TUNABLES)"),
    ({}, "Darwin", "kept by the system allocator's own rules (Darwin: no glibc tunables)"),
])
def test_the_users_allocator_and_settings_stand(environ, system, expected):
    libc = FakeLibc()
    assert keep_freed_memory(environ=environ, system=system, libc=libc) == expected
    assert libc.calls == []
    # a child process started without them gets glibc's defaults, and the rest of the environment
    assert without_allocator_settings({**environ, "PATH": "/bin"}) == {"PATH": "/bin"}


CHILD = """
import json, resource, sys
import torch
from bert_recipes.training.host_memory import keep_freed_memory
torch.set_num_threads(1)  # fewer threads that could hold the main malloc arena at the wrong moment
line = keep_freed_memory() if sys.argv[1] == "keep" else "system"
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(8):  # 64 MiB, above glibc's largest mmap threshold; the heap settles in a few
    torch.ones(16 * 2**20).sum()
start = faults()
for _ in range(16):
    torch.ones(16 * 2**20).sum()  # allocated, written, freed
print(json.dumps({"line": line, "faults": faults() - start}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables: Linux only")
def test_a_freed_64_mib_tensor_is_reused_without_page_faults():
    """Without the tuning every allocation of a 64 MiB tensor is a fresh mmap: about 16,384
    page faults each time (4 KiB pages); with it, once the heap has settled (aligned blocks
    leave holes for the first few), the heap's pages are reused. Rarely (about 1 run in 10
    under a full test run) two of the allocations still fault, presumably served by another
    malloc arena while the main one was locked; the bound leaves room for that."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not glibc")
    env = without_allocator_settings(os.environ)
    result = {}
    for mode in ("keep", "system"):
        done = subprocess.run([sys.executable, "-c", CHILD, mode], capture_output=True, text=True, env=env, check=True)
        result[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["keep"]["line"].startswith("kept for reuse")
    pages = 16 * 16 * 2**20 * 4 // 4096  # 16 allocations of 64 MiB in 4 KiB pages
    assert result["system"]["faults"] > pages // 2  # re-faulted (fewer if the kernel maps huge pages)
    assert result["keep"]["faults"] < pages // 4  # reused: at most 3 of the 16 faulted in

"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file a run writes for others to read (recipes, results, manifests, leaderboard zips)
goes through here: the content is written to a hidden temporary file next to the target
and renamed over it with ``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it is renamed to ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    The parent folder must exist.
    """
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; return the path."""
    with replacing(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | os.PathLike, data, indent: int = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically; return the path."""
    return write_text(path, json.dumps(data, indent=indent))


def make_readable(directory: str | os.PathLike) -> None:
    """Give every file under ``directory`` the mode a plain ``open`` would (0644 under the
    usual umask): safetensors writes weights through a private temporary file (0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)

"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every file a run writes for others to read (recipes, results, manifests, leaderboard zips)
goes through here: the content is written to a hidden temporary file next to the target
and renamed over it with ``os.replace``, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
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


@contextlib.contextmanager
def building(folder: Path, clean: bool = True) -> Iterator[Path]:
    """The block writes the temporary folder ``folder`` (then :func:`swap_in`); when it fails,
    ``folder`` is removed (``clean``: the process that owns it), so a failed checkpoint or
    export leaves no half-written folder filling the disk. A failure with the disk full
    becomes ``OSError(ENOSPC)`` naming the folder, and one safetensors reports with its
    system error (a file size limit, a quota) that ``OSError``: safetensors and torch
    report them with their own errors ("I/O error", "unexpected pos").
    """
    try:
        yield folder
    except Exception as exc:
        number = None if isinstance(exc, OSError) else _system_error(str(exc), folder.parent)
        if clean:
            shutil.rmtree(folder, ignore_errors=True)
        if number is not None:
            raise OSError(number, os.strerror(number), str(folder.parent)) from exc
        raise


def _system_error(text: str, parent: Path) -> int | None:
    """The errno behind a writer's own error: safetensors (Rust) ends its I/O errors with
    ``(os error N)`` (a file size limit: 27, a quota: 122); torch's "unexpected pos" names
    none, so a nearly full disk counts as ENOSPC, and a file size limit set on the process
    as EFBIG. None when none applies."""
    found = re.search(r"\(os error (\d+)\)", text)
    if found:
        return int(found.group(1))
    if "No space left" in text or _nearly_full(parent):
        return errno.ENOSPC
    return errno.EFBIG if "unexpected pos" in text and _file_size_limited() else None


def _file_size_limited() -> bool:
    """Whether this process has a file size limit (``ulimit -f``), which torch's writer
    reports only as "unexpected pos" (found by a helper)."""
    try:
        import resource

        return resource.getrlimit(resource.RLIMIT_FSIZE)[0] != resource.RLIM_INFINITY
    except (ImportError, OSError, ValueError):
        return False


def _nearly_full(path: Path, margin: int = 16 << 20) -> bool:
    try:
        return shutil.disk_usage(path).free < margin
    except OSError:
        return False


def swap_in(tmp: Path, target: Path) -> Path:
    """Rename the finished folder ``tmp`` to ``target``, replacing what is there: the old
    folder is renamed aside (``.<name>.old``) and deleted after, so at every moment the old
    or the new one is whole under some name (it was deleted first, then the new one renamed:
    a kill in between left neither; found by a helper). A symbolic link at ``target`` is
    replaced, not followed."""
    old = target.with_name(f".{target.name}.old")
    if target.is_symlink():
        target.unlink()
    elif target.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)
    return target


def make_readable(directory: str | os.PathLike) -> None:
    """Give every file under ``directory`` the mode a plain ``open`` would (0644 under the
    usual umask): safetensors writes weights through a private temporary file (0600)."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(directory).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, 0o666 & ~mask)

"""The run directory: refuse another run's, and replace one only when asked to.

:func:`check_output_dir` is the preflight half (reads only, raises one-line errors, says
what ``overwrite: true`` will delete); :func:`prepare_output_dir` is the destructive half,
run only once every check has passed.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from pathlib import Path

from ..errors import UserError

logger = logging.getLogger("bert_recipes")

# A folder holds a run once training has started: it has logged a step, saved a checkpoint
# or exported. A run that failed before that (an empty corpus, a bad tokenizer) leaves only
# recipe.yaml and tokenizer/, and the same command can simply be run again.
RUN_MARKERS = ("metrics.jsonl", "checkpoints", "final", "best", "results.json")
RUN_FILES = (*RUN_MARKERS, "recipe.yaml", "tokenizer", "logs", "summary.json", "plots")  # plots: `bert-recipes plot`'s default folder


def check_output_dir(recipe, artefacts: tuple[str, ...] = ()) -> list[str]:
    """Check ``output_dir`` without touching it; return the names ``overwrite`` will delete.

    A directory holding a previous run (one that started training: ``metrics.jsonl``,
    ``checkpoints/``, an export) is accepted only when resuming (``resume_from``) or
    with ``overwrite: true``, which deletes that run's artefacts (recipe, metrics,
    checkpoints, export, tokenizer, and the command's own ``artefacts``) and nothing else.

    Raises:
        UserError: the directory holds another run and neither option is set, it is a
            file, it is or (with ``overwrite``) contains what this run reads, or it holds a
            run of the other kind.
    """
    out = Path(recipe.output_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output_dir: '{out}' exists and is not a directory")
    for key, source in recipe.reads().items():  # a run writes its recipe.yaml, tokenizer and export there
        if out.is_dir() and Path(os.path.expanduser(source)).resolve() == out.resolve():
            raise UserError(f"output_dir: '{out}' is the {key} this run reads; its recipe.yaml, tokenizer and "
                            "checkpoints would be written into it: choose another output_dir")
    if recipe.resume_from:
        return []
    previous = [name for name in RUN_MARKERS if (out / name).exists()]
    if previous and not recipe.overwrite:
        raise UserError(f"output_dir: '{out}' already holds a run ({', '.join(previous)}); "
                        "set resume_from=latest to continue it, overwrite=true to replace it, "
                        "or output_dir=DIR for a new run")
    doomed = [name for name in (*RUN_FILES, *artefacts) if (out / name).exists()] if recipe.overwrite else []
    if doomed:
        _check_overwrite_is_safe(recipe, out)
    return doomed


def prepare_output_dir(recipe, accelerator, doomed: list[str]) -> Path:
    """Create ``output_dir``, lock it (:func:`lock_output_dir`) and delete ``doomed`` (from
    :func:`check_output_dir`); every rank calls it, the main process writes.

    Raises:
        UserError: on every rank, another process holds the folder's lock.
    """
    from accelerate.utils import broadcast_object_list

    out = Path(recipe.output_dir)
    accelerator.wait_for_everyone()
    refused = [None]
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock_output_dir(out)
        except UserError as exc:
            refused = [str(exc)]
    if accelerator.num_processes > 1:
        broadcast_object_list(refused)  # every rank stops, none waits at the next barrier
    if refused[0]:
        raise UserError(refused[0])
    if accelerator.is_main_process:
        for name in doomed:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()  # a link is removed, never what it points to
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


LOCK_FILE = ".lock"
_HELD: dict[str, int] = {}  # output_dir -> this process's open lock file, until release_output_dir


def lock_output_dir(out: Path) -> None:
    """Hold an exclusive lock on ``out/.lock`` until the run ends (:func:`release_output_dir`)
    or its process exits, so a second run launched into the same folder (a job started twice)
    is refused before it deletes or writes anything; two runs wrote into one folder, the
    second deleting the first's checkpoints (found by a helper). A POSIX record lock
    (``lockf``): it belongs to the process, so forked DataLoader workers do not hold it on,
    and it goes with the process even on SIGKILL. No lock where ``fcntl`` is missing (Windows).

    Raises:
        UserError: another process holds it.
    """
    try:
        import fcntl
    except ImportError:
        return
    key = str(out.resolve())
    if key in _HELD:
        return
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        holder = _lock_holder(fcntl, fd)
    except OSError as exc:  # NFS without lockd, Lustre without flock: no locks there
        os.close(fd)
        logger.warning("output_dir: %s cannot be locked (%s): nothing stops a second run from writing there",
                       out, exc.strerror)
        return
    if holder is not None:
        os.close(fd)
        raise UserError(f"output_dir: '{out}' is in use by another run (process {holder} holds "
                        f"{out / LOCK_FILE}); wait for it to finish or choose another output_dir")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def _lock_holder(fcntl, fd: int) -> str | None:
    """Take the lock on the open lock file ``fd``: None when taken, else the process id
    written in it by the process holding it (``"?"`` when unreadable).

    Raises:
        OSError: the filesystem does not support locks (ENOLCK, ENOSYS, EOPNOTSUPP, ...).
    """
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        return os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"


def check_unlocked(paths: list[Path]) -> None:
    """None of the run folders in or under ``paths`` is locked by a running process
    (:func:`lock_output_dir`): a sweep's ``overwrite=true`` deleted the cells of a sweep still
    training there (found by a helper). Each lock is tried and given back at once.

    Raises:
        UserError: one line naming the first folder in use.
    """
    try:
        import fcntl
    except ImportError:
        return
    for path in paths:
        locks = [path] if path.name == LOCK_FILE else path.rglob(LOCK_FILE) if path.is_dir() else []
        for lock in locks:
            fd = os.open(lock, os.O_RDWR)
            try:
                holder = _lock_holder(fcntl, fd)
                if holder is None:
                    fcntl.lockf(fd, fcntl.LOCK_UN)
            except OSError:  # no locks on this filesystem: none to respect
                holder = None
            finally:
                os.close(fd)
            if holder is not None:
                raise UserError(f"output_dir: '{lock.parent}' is in use by another run (process {holder}); "
                                "overwrite=true would delete it: wait for it to finish")


def release_output_dir(out: str | os.PathLike) -> None:
    """Give up this process's lock on ``out`` (a run's end: a sweep runs many in one process)."""
    fd = _HELD.pop(str(Path(out).resolve()), None)
    if fd is not None:
        os.close(fd)


def _run_kind(raw: dict) -> str:
    """``fine-tuning`` or ``pretraining``, for a recipe as a dict."""
    from ..recipe import is_finetuning_recipe

    return "fine-tuning" if is_finetuning_recipe(raw) else "pretraining"


def read_inside(recipe, folder: Path) -> tuple[str, str] | None:
    """The first ``(key, path)`` of ``recipe.reads()`` that is ``folder`` or lies inside it
    (what deleting ``folder`` would take from the run); None when there is none. A Hub id
    (no such local path) lies nowhere."""
    root = folder.resolve()
    for key, source in recipe.reads().items():
        path = Path(os.path.expanduser(source)).resolve()
        if path.exists() and (path == root or root in path.parents):
            return key, source
    return None


def _check_overwrite_is_safe(recipe, out: Path) -> None:
    """``overwrite: true`` never deletes what the run reads, nor a run of the other kind.

    Raises:
        UserError: a folder of ``recipe.reads()`` lies inside ``out``, or ``out`` holds a
            pretraining run and this is a fine-tuning run (or the reverse).
    """
    import yaml

    read = read_inside(recipe, out)
    if read:
        raise UserError(f"output_dir: '{out}' contains {read[0]} '{read[1]}', which this run reads; "
                        "overwrite=true would delete it: choose another output_dir")
    try:
        previous = yaml.safe_load((out / "recipe.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return
    if isinstance(previous, dict) and _run_kind(previous) != recipe.kind:
        raise UserError(f"output_dir: '{out}' holds a {_run_kind(previous)} run; overwrite=true only replaces a "
                        f"{recipe.kind} run: choose another output_dir")

"""What the command line prints for an error, in one line on stderr, and its exit code:
a user's mistake (:class:`~bert_recipes.errors.UserError`), an interruption, what the
machine refused (a full or read-only disk, no permission, no memory) and a launched run's
peer that stopped. Anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import os
import sys

from .errors import UserError

RUNS = ("pretrain", "finetune", "glue")  # commands with a run to continue after an interruption


def report_error(exc: BaseException, command: str | None) -> int | None:
    """Print the line for ``exc`` (raised by ``command``) and return the exit code: the
    error's own for a :class:`UserError`, 130 for an interruption, 1 when a peer rank stopped,
    2 for the machine's refusals; None (nothing printed) for any other error."""
    if isinstance(exc, UserError):
        say_error(_one_line(exc))
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        say_error("interrupted" + (" (a run continues from its last complete checkpoint with resume_from=latest)"
                                   if command in RUNS else ""), prefix="")
        return 130
    if isinstance(exc, OSError):
        message = environment_error(exc)
        if message is None:
            return None
        say_error(message)
        return 2
    if peer_stopped(exc):
        say_error(f"another process of this run stopped (its error, if it printed one, is above); rank "
                  f"{os.environ.get('RANK', '?')} stops too: {_one_line(exc)[:160]}")
        return 1
    # torch: "DefaultCPUAllocator: can't allocate memory", "CUDA out of memory"
    where = ("host" if isinstance(exc, MemoryError) or "can't allocate memory" in str(exc) else
             "device" if "out of memory" in str(exc) else None)
    if where is None:
        return None
    say_error(f"out of {where} memory ({_one_line(exc)[:200]}); check the model size (model.config), "
              "per_device_train_batch_size and max_seq_length")
    return 2


def say_error(message: str, prefix: str = "error: ") -> None:
    """Print one error line to stderr in a single write: under ``torchrun`` (unbuffered
    output) ``print`` wrote the text and its newline separately, and two ranks' lines came
    out glued together (found by a helper)."""
    sys.stderr.write(f"{prefix}{message}\n")
    sys.stderr.flush()


#: What a collective raises on a rank whose peer process died (gloo, NCCL).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote process exited")


def peer_stopped(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another rank of a launched run
    (``torchrun``: ``WORLD_SIZE`` > 1) exited: after that rank's own one-line error, this
    one printed a page of gloo traceback (found by a helper)."""
    from .training.accelerator import launched_processes

    return launched_processes() > 1 and any(text in str(exc) for text in PEER_GONE)


# what the machine, not the program, refused: a full or read-only disk, no permission, a file where a folder is expected
_ENVIRONMENT = {errno.ENOSPC: "free some space; a run resumes from its last complete checkpoint with resume_from=latest",
                errno.EDQUOT: "free some space; a run resumes from its last complete checkpoint with resume_from=latest",
                errno.EROFS: "choose a writable output_dir", errno.EACCES: "check the permissions, or choose another path",
                errno.EPERM: "check the permissions, or choose another path",
                errno.ENOTDIR: "a file stands where a folder is expected", errno.EISDIR: "expected a file, not a folder",
                errno.EFBIG: "a file size limit (ulimit -f) or the filesystem's largest file was reached; a run resumes "
                             "from its last complete checkpoint with resume_from=latest"}


def environment_error(exc: OSError) -> str | None:
    """One line for an ``OSError`` the machine raised (disk full, read-only, permission, a
    file where a folder is expected): its path, the system's words and what to do; None for
    another error (a traceback: a bug). Anything written before stays: checkpoints and exports
    are renamed into place only when complete (:mod:`bert_recipes.atomic`)."""
    hint = _ENVIRONMENT.get(exc.errno)
    if hint is None:
        return None
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{exc.strerror or os.strerror(exc.errno)} ({hint})"


def _one_line(exc: Exception) -> str:
    """The user's message; an error re-raised from a DataLoader worker carries the worker's
    traceback, whose last line is the original message."""
    text = str(exc).strip()
    if "\n" not in text:
        return text
    last = text.splitlines()[-1]
    name = f"{type(exc).__module__}.{type(exc).__name__}: "
    for prefix in (name, f"{type(exc).__name__}: "):
        if last.startswith(prefix):
            return last[len(prefix):]
    return last



"""Stopping a run cleanly: SIGTERM/SIGINT become a request the loop honours at the next
step boundary (after saving a checkpoint), and :class:`RunStopped` carries that outcome to
the command line, which exits with the signal's code."""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

logger = logging.getLogger("bert_recipes")


class RunStopped(Exception):
    """A run stopped by a signal after saving a checkpoint (resume it with ``resume_from=latest``).

    Attributes:
        signal: the signal's name (``SIGTERM``), step: the last completed step,
        checkpoint: the checkpoint saved at that step.
    """

    def __init__(self, signal_name: str, step: int, checkpoint: Path):
        super().__init__(f"stopped by {signal_name} at step {step}; checkpoint {checkpoint}; resume with resume_from=latest")
        self.signal, self.step, self.checkpoint = signal_name, step, checkpoint


class StopRequest:
    """Turns SIGTERM and SIGINT into a flag checked at step boundaries.

    A second signal at least :attr:`REPEAT_AFTER_S` seconds after the first interrupts at
    once (a user who insists); one sooner is the same stop delivered twice and is ignored: a
    scheduler that signals every process of the job (Slurm, systemd) reaches a rank directly
    and through its launcher (torchrun forwards it), milliseconds apart, and that second copy
    used to skip the checkpoint (found by a helper). The last signal that stopped a run is
    kept for the command's exit code (:func:`stopped_exit_code`).
    """

    last_signal: str | None = None
    REPEAT_AFTER_S = 2.0

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}
        self._first_at = 0.0

    def __enter__(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, _frame) -> None:
        if self.requested:
            if time.monotonic() - self._first_at < self.REPEAT_AFTER_S:
                return  # the same stop, delivered twice (directly and by the launcher)
            signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
            raise KeyboardInterrupt
        self.requested = StopRequest.last_signal = signal.Signals(signum).name
        self._first_at = time.monotonic()
        logger.warning("%s received: saving a checkpoint at the next step boundary (a second signal %gs or more "
                       "after it stops at once, without one)", self.requested, self.REPEAT_AFTER_S)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():  # after a stop, its late copy is still ignored
            signal.signal(sig, self._late_copy if self.requested else handler)

    def _late_copy(self, signum, frame) -> None:
        """After the run stopped: a copy of the stop within :attr:`REPEAT_AFTER_S` is ignored
        (it killed the process on its way out, exit -15 instead of 143); a later signal gets
        the handler there was before the run."""
        if time.monotonic() - self._first_at < self.REPEAT_AFTER_S:
            return
        previous = self._previous.get(signum, signal.SIG_DFL)
        signal.signal(signum, previous)
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:
            os.kill(os.getpid(), signum)


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def stop_with_launcher() -> bool:
    """Under ``torchrun`` / ``accelerate launch`` (``TORCHELASTIC_RUN_ID`` set) on Linux, ask
    the kernel for a SIGTERM when the launcher dies, so that a rank whose launcher was killed
    (``kill -9``, the out-of-memory killer) saves a checkpoint and stops instead of training
    on as an orphan holding ``output_dir/.lock`` (torchrun starts each rank in a session of
    its own, so nothing else reaches it). A launcher already gone before this call also
    stops the rank. Returns whether the request was made (False elsewhere, or without libc).
    """
    import sys

    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    import ctypes

    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != launcher:  # it died before the request (a launcher may itself be PID 1: a container's)
        os.kill(os.getpid(), signal.SIGTERM)
    return True


def stopped_exit_code() -> int:
    """The exit code of a run stopped by a signal after saving its checkpoint: 128 + the
    signal number, as a shell reports a process ended by it (SIGINT 130, SIGTERM 143), so
    that ``make pretrain && make finetune`` or a job script does not go on as if it had finished."""
    name = StopRequest.last_signal or "SIGTERM"
    return 128 + int(getattr(signal, name))


def any_rank_stopping(accelerator, requested: bool) -> bool:
    """Whether any rank asked to stop, the same answer on every rank, without waiting for the device.

    One process answers with its own flag. Several all-reduce their flags on the host, over
    a gloo process group (the default group when it is gloo, else one made once for this),
    so the decision never waits for a GPU.
    """
    if accelerator.num_processes == 1:
        return requested
    import torch
    import torch.distributed as dist

    flag = torch.tensor([float(requested)])
    dist.all_reduce(flag, group=_host_group())
    return flag[0].tolist() > 0  # a CPU tensor: no device sync


_HOST_GROUP: list = []  # [(the default group it was made under, the gloo group)]


def _host_group():
    """The process group for host-side agreements: the default one if it is gloo, else a gloo
    group made once per default group (a new one after the default group is re-created)."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    if not _HOST_GROUP or _HOST_GROUP[0][0] is not dist.group.WORLD:
        _HOST_GROUP[:] = [(dist.group.WORLD, dist.new_group(backend="gloo"))]
    return _HOST_GROUP[0][1]

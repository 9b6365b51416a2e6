"""The pretraining DataLoader and the held-out batches, over :class:`~.stream.PretrainingStream`.

Batches are padded to the longest instance (a multiple of ``pad_to_multiple_of``) or, with
``data.packing``, packed several instances per row (:mod:`.packing`). Each DataLoader
worker is a data shard; ``state_dict()`` / ``load_state_dict()`` resume exactly.
"""

from __future__ import annotations

import os
import signal
import warnings
from typing import Optional

import torch

from ..errors import DataError
from .collator import PretrainingCollator
from .packing import PackedCollator
from .checks import check_files, use_index
from .stream import PretrainingStream, check_saved_state


def make_collator(cfg, tokenizer):
    """:class:`~.packing.PackedCollator` with ``cfg.packing`` (``"batch"``: each batch's
    instances into rows of ``max_seq_length``), else :class:`~.collator.PretrainingCollator`."""
    if not cfg.packing:
        return PretrainingCollator(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of, max_seq_length=cfg.max_seq_length)
    return PackedCollator(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of, max_seq_length=cfg.max_seq_length,
                          fill_rows=cfg.packing == "batch")


def check_saved_workers(state: dict, workers: int) -> None:
    """Refuse a saved loader ``state`` (``loader.state_dict()``) written with another number of
    DataLoader workers than ``workers``.

    Raises:
        DataError: one line naming ``data.dataloader_num_workers`` and the saved number.
    """
    saved = state.get("_snapshot", {}).get("_main_snapshot", {}).get("_num_workers", 0) if "_snapshot" in state else 0
    if ("_snapshot" in state) != (workers > 0) or saved != workers:
        raise DataError(f"data.dataloader_num_workers: the saved data state is for {saved} DataLoader worker(s), "
                        f"this run has {workers}; resume with data.dataloader_num_workers={saved}")


def check_saved_data(state, cfg, fingerprints: Optional[tuple[str, ...]], key: str = "data.train_files") -> None:
    """Check every stream state inside a saved loader ``state`` (the main process's and each
    DataLoader worker's) with :func:`~.stream.check_saved_state`: a resume's preflight, before
    anything is written (the loader itself checks them only once its iterator starts).

    Raises:
        DataError: see :func:`~.stream.check_saved_state`.
    """
    if isinstance(state, dict):
        if state.get("version") is not None and "access" in state:  # a PretrainingStream's state
            check_saved_state(state, cfg, fingerprints, key)
            return
        for value in state.values():
            check_saved_data(value, cfg, fingerprints, key)


def ignore_stop_signals(_worker_id: int) -> None:
    """A DataLoader worker's ``worker_init_fn``: SIGINT and SIGTERM are ignored in the worker.
    A Ctrl-C in a terminal (or a scheduler's SIGTERM to the process group) reaches the workers
    too; they must keep serving batches while the main process finishes its step and saves a
    checkpoint (:class:`~bert_recipes.training.signals.StopRequest`), then shuts them down."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def stop_workers(batches) -> None:
    """Shut down now the DataLoader workers behind ``batches`` (an iterator of the loader
    :func:`build_pretraining_dataloader` returns; anything else is left alone), as the
    iterator's own finaliser does: each gets the end-of-work sentinel and is joined. Workers
    ignore SIGTERM (:func:`ignore_stop_signals`), so they must not be left to
    ``multiprocessing``'s exit handler, which terminates and then joins them (it would wait
    forever); one still alive after the shutdown is killed."""
    shutdown = getattr(batches, "_shutdown_workers", None)  # the finaliser's own method (torch's DataLoader)
    if shutdown is None:
        return
    shutdown()
    for worker in getattr(batches, "_workers", ()):
        if worker.is_alive():
            worker.kill()
            worker.join()


def build_pretraining_dataloader(cfg, tokenizer, files: list[str], *, batch_size: int, seed: int, rank: int = 0,
                                 world_size: int = 1, infinite: bool = True, max_samples: Optional[int] = None,
                                 num_workers: Optional[int] = None, key: str = "data.train_files"):
    """A ``torchdata.stateful_dataloader.StatefulDataLoader`` over a :class:`PretrainingStream`.

    Yields dicts of ``torch.long`` tensors: ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels``: ``[B, L]``; ``next_sentence_label``: ``[B]`` (with
    ``cfg.packing: batch``: the B instances packed into fewer rows of ``max_seq_length``; with
    ``cfg.packing: true``: B rows packed by the stream, see :mod:`.packing`). ``L`` is the
    longest instance of the batch rounded up to ``cfg.pad_to_multiple_of``, but never more
    than ``cfg.max_seq_length`` (when that is not a multiple, a full-length batch has
    ``L = cfg.max_seq_length``). ``num_workers`` defaults to ``cfg.dataloader_num_workers``;
    each worker is a data shard and ignores SIGINT/SIGTERM (:func:`ignore_stop_signals`).
    ``loader.state_dict()`` / ``load_state_dict()`` restore the
    exact stream position, with or without workers (torchdata snapshots worker states every
    batch, incrementally). Resume with the same ``world_size`` and number of workers.

    Raises:
        DataError: see :class:`PretrainingStream`.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    workers = cfg.dataloader_num_workers if num_workers is None else num_workers
    stream = PretrainingStream(cfg, tokenizer, files, seed=seed, rank=rank, world_size=world_size,
                               infinite=infinite, max_samples=max_samples, key=key)
    collator = make_collator(cfg, tokenizer)
    if workers > 0:  # tokenizers' Rust thread pool does not survive fork; say so once, quietly
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A private generator: creating the iterator must not draw from torch's global RNG
    # (which drives dropout), or a resumed run would diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    class PretrainingDataLoader(StatefulDataLoader):
        def load_state_dict(self, state: dict) -> None:
            """Raises DataError (one line) for a state saved with another number of workers."""
            check_saved_workers(state, self.num_workers)
            super().load_state_dict(state)

    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in recent torch
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return PretrainingDataLoader(stream, batch_size=batch_size, collate_fn=collator, num_workers=workers,
                                     generator=generator, worker_init_fn=ignore_stop_signals if workers else None)


def build_eval_batches(cfg, tokenizer, files: list[str], *, batch_size: int, seed: int, rank: int = 0,
                       world_size: int = 1, max_samples: Optional[int] = None) -> list[dict]:
    """This rank's held-out batches: the same instances whatever the number of processes.

    One single-shard pass over ``files`` (no shuffle buffer, at most ``max_samples``
    instances, seeded with ``seed``) is built on every rank; rank ``r`` of ``w`` takes
    instances ``r, r + w, ...``, collated into batches of ``batch_size`` (dicts of
    ``torch.long`` tensors as :func:`build_pretraining_dataloader`). Ranks may get one batch
    more or less than others.

    Raises:
        DataError: see :class:`PretrainingStream` (naming ``data.eval_files``).
    """
    eval_cfg = cfg.model_copy(update={"shuffle_buffer_size": 0, "packing": False})  # instances; packed per batch
    stream = PretrainingStream(eval_cfg, tokenizer, files, seed=seed, infinite=False, max_samples=max_samples,
                               key="data.eval_files")
    mine = [item for i, item in enumerate(stream) if i % world_size == rank]
    collator = make_collator(cfg, tokenizer)
    return [collator(mine[i : i + batch_size]) for i in range(0, len(mine), batch_size)]


__all__ = ["PretrainingStream", "build_eval_batches", "build_pretraining_dataloader", "check_files", "check_saved_data",
           "check_saved_workers",
           "ignore_stop_signals",
           "make_collator", "stop_workers", "use_index"]

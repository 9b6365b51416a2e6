"""The pretraining stream and its DataLoader: sharding, shuffling, exact resume.

:class:`PretrainingStream` turns files (or a Hub dataset) into masked NSP instances on the
fly, following create_pretraining_data.py of google-research/bert, without a
preprocessing pass over the corpus:

    documents (corpus.py) -> sentences -> token ids (tokenizer, batched per document)
    -> NSP pairs (instances.py) -> MLM masking (masking.py) -> shuffle buffer -> instances

Sharding: with ``S = world_size * num_workers`` shards, shard ``s = rank * num_workers +
worker_id`` owns the documents whose index in the pass's enumeration is ``s`` modulo ``S``.
Every shard enumerates all documents (cheap), but only sentence-splits and tokenizes its
own. One pass of all shards covers the corpus exactly once. Each pass shuffles the file
order with ``(seed, pass)``; with ``infinite=True`` every shard cycles forever.

Random B segments come from a bounded :class:`~.instances.RandomNextBuffer` of earlier
documents. The stream reads one document ahead (its sentences enter the buffer before the
current document is used), so even the first document of a shard has another document to
draw from.

State: everything that determines the rest of the stream is in :meth:`state_dict` (plain
lists, dicts and ints): the pass number, the position in the document enumeration, the
numpy RNG state, the document being consumed and the one read ahead (as token ids), the
random-next buffer and the shuffle buffer. Large values are shared, never copied, and the
containers are keyed by slot, so torchdata's per-batch incremental worker snapshots only
carry what changed.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import DataError
from .collator import PretrainingCollator
from .corpus import RawDocument, iter_raw_documents
from .instances import DocumentCursor, InstanceBuilder, PairInstance, RandomNextBuffer
from .masking import MaskingVocab, create_masked_lm_predictions

logger = logging.getLogger("bert_recipes")

STATE_VERSION = 1
_SEED_MASK = (1 << 63) - 1


def _new_stats() -> dict:
    return {"documents": 0, "owned": 0, "with_text": 0, "single_sentence": 0, "instances": 0}


@dataclass
class _StreamState:
    """The live, resumable state of one shard (see the module docstring)."""

    shard: int
    num_shards: int
    rng: np.random.Generator
    buffer: RandomNextBuffer
    epoch: int = 0
    file_position: int = 0
    file_first_index: int = 0
    next_document: int = 0
    emitted: int = 0
    stats: dict = field(default_factory=_new_stats)
    current: Optional[DocumentCursor] = None
    lookahead: Optional[list] = None  # [key, sentences], never modified
    shuffle: list = field(default_factory=list)  # [input_ids, token_type_ids, labels, nsp], never modified


def _as_dict(item: list) -> dict:
    return {"input_ids": item[0], "token_type_ids": item[1], "labels": item[2], "next_sentence_label": item[3]}


def check_files(files: list[str], cfg) -> None:
    """Raise :class:`DataError` when there is no source, or every file is empty (0 bytes)."""
    if not files and not cfg.dataset_name:
        raise DataError("data.train_files: no files to read (and no data.dataset_name)")
    if files and all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"data.train_files: all {len(files)} file(s) are empty (e.g. {files[0]})")


class PretrainingStream(torch.utils.data.IterableDataset):
    """Masked NSP instances from ``files``, sharded, shuffled and resumable.

    Args:
        cfg: the :class:`~bert_recipes.recipe.DataConfig`.
        tokenizer: a fast BERT tokenizer ([CLS] [SEP] [MASK] [PAD] [UNK]).
        files: expanded local files; empty to stream ``cfg.dataset_name``.
        seed: determines file orders, instance building, masking and shuffling.
        rank, world_size: this process among the data-parallel ranks.
        infinite: cycle over the data forever; else stop after one pass.
        max_samples: stop after this many instances (split over DataLoader workers).

    Yields:
        dicts with ``input_ids``, ``token_type_ids``, ``labels`` (lists of ints, length
        ``<= cfg.max_seq_length``; labels -100 where not masked) and
        ``next_sentence_label`` (0 = IsNext, 1 = random).

    Raises:
        DataError: no source or all files empty (here); no text at all, or a shard without
            documents in an infinite stream (when a pass ends); a state saved with a
            different number of shards (on resume).
    """

    def __init__(self, cfg, tokenizer, files: list[str], *, seed: int, rank: int = 0, world_size: int = 1,
                 infinite: bool = True, max_samples: Optional[int] = None):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        check_files(list(files), cfg)
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.files = list(files)
        self.seed = int(seed)
        self.rank = rank
        self.world_size = world_size
        self.infinite = infinite
        self.max_samples = max_samples
        self.vocab = MaskingVocab.from_tokenizer(tokenizer)
        self.builder = InstanceBuilder(
            max_seq_length=cfg.max_seq_length,
            short_seq_prob=cfg.short_seq_prob,
            random_next_prob=cfg.random_next_prob,
            cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id,
        )
        self._pending: Optional[dict] = None
        self._live: Optional[_StreamState] = None
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ sharding

    def _worker(self) -> tuple[int, int]:
        info = torch.utils.data.get_worker_info()
        return (info.id, info.num_workers) if info is not None else (0, 1)

    def _shard(self) -> tuple[int, int]:
        worker, workers = self._worker()
        return self.rank * workers + worker, self.world_size * workers

    def _limit(self) -> Optional[int]:
        """This worker's share of ``max_samples``."""
        if self.max_samples is None:
            return None
        worker, workers = self._worker()
        return self.max_samples // workers + (1 if worker < self.max_samples % workers else 0)

    def _file_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed & _SEED_MASK, epoch])
        return [int(i) for i in rng.permutation(len(self.files))]

    # ------------------------------------------------------------------ state

    def _fresh_state(self, shard: int, num_shards: int) -> _StreamState:
        rng = np.random.default_rng([self.seed & _SEED_MASK, shard, num_shards])
        return _StreamState(shard, num_shards, rng, RandomNextBuffer(self.cfg.random_next_buffer_size,
                                                                     self.cfg.max_seq_length - 3))

    def _restored_state(self, state: dict, shard: int, num_shards: int) -> _StreamState:
        if (state["shard"], state["num_shards"]) != (shard, num_shards):
            raise DataError(
                f"data.dataloader_num_workers: the saved data state is for shard {state['shard']} of "
                f"{state['num_shards']} (world_size x dataloader workers) but this run has shard {shard} of "
                f"{num_shards}; resume with the same world size and data.dataloader_num_workers"
            )
        st = self._fresh_state(shard, num_shards)
        st.rng.bit_generator.state = state["rng"]
        st.buffer.load_state_dict(state["random_next"])
        st.epoch, st.emitted = int(state["epoch"]), int(state["emitted"])
        st.file_position, st.file_first_index = int(state["file_position"]), int(state["file_first_index"])
        st.next_document = int(state["next_document"])
        st.stats = {**_new_stats(), **state["stats"]}
        st.current = DocumentCursor.from_state(state["current"])
        st.lookahead = state["lookahead"] or None
        st.shuffle = [state["shuffle"][str(i)] for i in range(len(state["shuffle"]))]
        return st

    def state_dict(self) -> dict:
        """The stream position (plain Python values; large values shared, not copied)."""
        st = self._live
        if st is None:
            return dict(self._pending) if self._pending else {"version": STATE_VERSION}
        return {
            "version": STATE_VERSION,
            "shard": st.shard,
            "num_shards": st.num_shards,
            "epoch": st.epoch,
            "file_position": st.file_position,
            "file_first_index": st.file_first_index,
            "next_document": st.next_document,
            "emitted": st.emitted,
            "stats": dict(st.stats),
            "rng": st.rng.bit_generator.state,
            "current": st.current.state_dict() if st.current is not None else None,
            "lookahead": st.lookahead,
            "random_next": st.buffer.state_dict(),
            "shuffle": {str(i): item for i, item in enumerate(st.shuffle)},
        }

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` at the next ``iter()`` (a state without position restarts)."""
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data state: unsupported version {state.get('version')!r} (expected {STATE_VERSION})")
        self._pending = state if "epoch" in state else None
        self._live = None

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict]:
        shard, num_shards = self._shard()
        if self._pending is not None:
            st = self._restored_state(self._pending, shard, num_shards)
        else:
            st = self._fresh_state(shard, num_shards)
        self._pending = None
        self._live = st  # set eagerly: torchdata snapshots the state before the first item
        return self._shuffled(st, self._limit())

    def _shuffled(self, st: _StreamState, limit: Optional[int]) -> Iterator[dict]:
        """Instances through the shuffle buffer (``cfg.shuffle_buffer_size``, 0 = off)."""
        size = self.cfg.shuffle_buffer_size
        if limit is not None and st.emitted >= limit:
            return
        for item in self._instances(st):
            if size == 0:
                st.emitted += 1
                yield _as_dict(item)
            elif len(st.shuffle) < size:
                st.shuffle.append(item)
                continue
            else:
                slot = int(st.rng.integers(size))
                out, st.shuffle[slot] = st.shuffle[slot], item
                st.emitted += 1
                yield _as_dict(out)
            if limit is not None and st.emitted >= limit:
                return
        while st.shuffle and (limit is None or st.emitted < limit):  # finite stream: drain
            slot = int(st.rng.integers(len(st.shuffle)))
            out = st.shuffle[slot]
            st.shuffle[slot] = st.shuffle[-1]
            st.shuffle.pop()
            st.emitted += 1
            yield _as_dict(out)

    def _instances(self, st: _StreamState) -> Iterator[list]:
        """Masked instances in document order, pass after pass; updates ``st`` before each yield."""
        documents = self._documents(st)
        while True:
            if st.current is not None:
                pair = self.builder.next_instance(st.current, st.buffer, st.rng)
                if pair is not None:
                    st.stats["instances"] += 1
                    self._warn_same_document(st)
                    yield self._masked(pair, st.rng)
                    continue
                st.current = None
            if st.lookahead is None:
                st.lookahead = self._next_document(st, documents)
            if st.lookahead is None:  # the pass is over
                self._end_pass(st)
                if not self.infinite:
                    return
                st.epoch, st.file_position, st.file_first_index, st.next_document = st.epoch + 1, 0, 0, 0
                st.stats = _new_stats()
                documents = self._documents(st)
                continue
            key, sentences = st.lookahead
            st.current = self.builder.start(key, sentences, st.rng)
            st.lookahead = self._next_document(st, documents)

    def _documents(self, st: _StreamState) -> Iterator[RawDocument]:
        return iter_raw_documents(
            self.files,
            self.cfg,
            order=self._file_order(st.epoch),
            start=st.next_document,
            start_file=st.file_position,
            start_file_index=st.file_first_index,
            keep=lambda index: index % st.num_shards == st.shard,
        )

    def _next_document(self, st: _StreamState, documents: Iterator[RawDocument]) -> Optional[list]:
        """The shard's next non-empty document as ``[key, sentences]`` (entered into the
        random-next buffer), or None at the end of the pass."""
        for raw in documents:
            st.next_document, st.file_position, st.file_first_index = raw.index + 1, raw.file_position, raw.file_first_index
            st.stats["documents"] += 1
            if raw.paragraphs is None:
                continue
            st.stats["owned"] += 1
            sentences = self._tokenize(raw.sentences())
            if not sentences:
                continue
            st.stats["with_text"] += 1
            st.stats["single_sentence"] += len(sentences) == 1
            st.buffer.add_document(raw.key, sentences, st.rng)
            return [raw.key, sentences]
        return None

    def _tokenize(self, sentences: list[str]) -> list[list[int]]:
        """Token ids per sentence (one batched tokenizer call), empty ones dropped."""
        if not sentences:
            return []
        encoded = self.tokenizer(
            sentences, add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False,
            verbose=False,
        )["input_ids"]
        return [ids for ids in encoded if ids]

    def _masked(self, pair: PairInstance, rng: np.random.Generator) -> list:
        input_ids, labels = create_masked_lm_predictions(
            pair.input_ids,
            self.vocab,
            rng,
            masked_lm_prob=self.cfg.masked_lm_prob,
            max_predictions_per_seq=self.cfg.max_predictions_per_seq,
            whole_word_mask=self.cfg.whole_word_mask,
        )
        return [input_ids.tolist(), pair.token_type_ids.tolist(), labels.tolist(), pair.next_sentence_label]

    # ------------------------------------------------------------------ diagnostics

    def _where(self) -> str:
        return f"{len(self.files)} file(s)" if self.files else f"dataset '{self.cfg.dataset_name}'"

    def _end_pass(self, st: _StreamState) -> None:
        stats = st.stats
        if stats["single_sentence"] and "single_sentence" not in self._warned:
            self._warned.add("single_sentence")
            logger.warning(
                "data: %d of %d documents (data shard %d of %d) have a single sentence; as in "
                "google-research/bert they are used, but only for random-next (NSP label 1) instances",
                stats["single_sentence"], stats["with_text"], st.shard, st.num_shards,
            )
        if stats["instances"]:
            return
        if stats["documents"] == 0 or (stats["with_text"] == 0 and stats["owned"] == stats["documents"]):
            raise DataError(f"data.train_files: no text to build pretraining instances from in {self._where()} "
                            f"({stats['documents']} document(s), all empty)")
        if self.infinite:
            raise DataError(
                f"data.train_files: data shard {st.shard} of {st.num_shards} (world_size x dataloader workers) "
                f"got no text: {self._where()} hold {stats['documents']} document(s), {stats['owned']} of them "
                f"for this shard; use more documents (data.document_split) or fewer data.dataloader_num_workers"
            )

    def _warn_same_document(self, st: _StreamState) -> None:
        if self.builder.same_document_fallbacks and "same_document" not in self._warned:
            self._warned.add("same_document")
            logger.warning(
                "data: the corpus has too few documents for next-sentence prediction: a random-next B segment "
                "came from the same document (data shard %d of %d sees no other document yet); add documents "
                "or use data.document_split: blank_line", st.shard, st.num_shards,
            )


def build_pretraining_dataloader(cfg, tokenizer, files: list[str], *, batch_size: int, seed: int, rank: int = 0,
                                 world_size: int = 1, infinite: bool = True, max_samples: Optional[int] = None,
                                 num_workers: Optional[int] = None):
    """A ``torchdata.stateful_dataloader.StatefulDataLoader`` over a :class:`PretrainingStream`.

    Yields dicts of ``torch.long`` tensors: ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels``: ``[B, L]``; ``next_sentence_label``: ``[B]``. ``L`` is the
    longest instance of the batch rounded up to ``cfg.pad_to_multiple_of``, but never more
    than ``cfg.max_seq_length`` (when that is not a multiple, a full-length batch has
    ``L = cfg.max_seq_length``). ``num_workers`` defaults to ``cfg.dataloader_num_workers``;
    each worker is a data shard. ``loader.state_dict()`` / ``load_state_dict()`` restore the
    exact stream position, with or without workers (torchdata snapshots worker states every
    batch, incrementally). Resume with the same ``world_size`` and number of workers.

    Raises:
        DataError: see :class:`PretrainingStream`.
    """
    from torchdata.stateful_dataloader import StatefulDataLoader

    workers = cfg.dataloader_num_workers if num_workers is None else num_workers
    stream = PretrainingStream(cfg, tokenizer, files, seed=seed, rank=rank, world_size=world_size,
                               infinite=infinite, max_samples=max_samples)
    collator = PretrainingCollator(tokenizer, pad_to_multiple_of=cfg.pad_to_multiple_of,
                                   max_seq_length=cfg.max_seq_length)
    if workers > 0:  # tokenizers' Rust thread pool does not survive fork; say so once, quietly
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A private generator: creating the iterator must not draw from torch's global RNG
    # (which drives dropout), or a resumed run would diverge from an uninterrupted one.
    generator = torch.Generator().manual_seed(seed)
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in recent torch
        warnings.filterwarnings("ignore", message=".*set_vital.*")
        return StatefulDataLoader(stream, batch_size=batch_size, collate_fn=collator, num_workers=workers,
                                  generator=generator)


__all__ = ["PretrainingStream", "build_pretraining_dataloader", "check_files"]

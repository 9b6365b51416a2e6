"""The pretraining stream: sharding, shuffling, exact resume.

:class:`PretrainingStream` turns files (or a Hub dataset) into masked NSP instances on the
fly, following create_pretraining_data.py of google-research/bert, without a
preprocessing pass over the corpus:

    document index (index.py; a cached byte scan) -> a shard's documents in the corpus-wide
    permutation (sources.py) -> sentences -> token ids (reader.py) -> NSP pairs with random
    B from the whole corpus (instances.py) -> MLM masking (masking.py) -> shuffle buffer

Sharding: ``S = world_size * num_workers`` shards; shard ``s = rank * num_workers +
worker_id`` reads only its own documents (positions ``s mod S`` of each pass's
permutation). One pass of all shards covers the corpus exactly once; with
``infinite=True`` every shard goes on to the next pass (a new permutation).

Access: ``data.corpus_access: auto`` indexes local files (text, JSON Lines, parquet) and
falls back to front-to-back streaming (:class:`~.sources.StreamedSource`) for a Hub
dataset or files that cannot be read by position (compressed, JSON arrays); ``index`` and
``stream`` force one.

State: everything that determines the rest of the stream is in :meth:`state_dict` (plain
lists, dicts and ints): the pass, the source's position (for the indexed source a few
ints per open document, which is read again on resume), the numpy RNG state and the
shuffle buffer. Containers are keyed by slot, so torchdata's per-batch incremental worker
snapshots carry only what changed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Iterator, Optional

import numpy as np
import torch

from ..errors import DataError
from .checks import check_document_count, check_files, use_index
from .index import build_index
from .instances import InstanceBuilder, PairInstance
from .masking import MaskingVocab, create_masked_lm_predictions
from .packing import pack_rows
from .reader import IndexedCorpus, plain_backend, tokenize_sentences
from .sources import IndexedSource, StreamedSource, new_stats

logger = logging.getLogger("bert_recipes")

STATE_VERSION = 2
_SEED_MASK = (1 << 63) - 1
# the first documents a shard opens are checked for single-sentence documents (early warning)
EARLY_CHECK_DOCUMENTS = 200
SINGLE_SENTENCE_WARN_SHARE = 0.1


@dataclass
class _StreamState:
    """The live, resumable state of one shard (see the module docstring)."""

    shard: int
    num_shards: int
    rng: np.random.Generator
    position: dict
    epoch: int = 0
    emitted: int = 0
    stats: dict = field(default_factory=new_stats)
    shuffle: list = field(default_factory=list)  # [input_ids, token_type_ids, labels, nsp, (origin)], never modified
    packer: dict = field(default_factory=lambda: {"window": [], "ready": []})  # data.packing: see packing.pack_rows


def check_saved_state(state: dict, cfg, fingerprints: Optional[tuple[str, ...]],
                      key: str = "data.train_files") -> None:
    """Whether a saved stream ``state`` (:meth:`PretrainingStream.state_dict`) can resume a
    stream of ``cfg`` over a corpus whose index has one of ``fingerprints`` (its layout's, and
    the path-and-time one earlier versions saved; None: read as a stream, not indexed). Used by :meth:`PretrainingStream.load_state_dict` and, before anything is
    written, by a resume's preflight (:func:`~.loader.check_saved_data`).

    Raises:
        DataError: a state of another format version, corpus access mode, corpus (files,
            their contents, the document/sentence split) or packing mode (rows packed by the
            stream, ``data.packing: true``, against instances).
    """
    if state.get("version") != STATE_VERSION:
        raise DataError(f"data state: unsupported version {state.get('version')!r} (expected {STATE_VERSION}); "
                        "it was saved by another version of bert-recipes")
    if "epoch" not in state:
        return
    access = "index" if fingerprints is not None else "stream"
    if state["access"] != access:  # first: the access mode changes the fingerprint too
        raise DataError(f"data.corpus_access: the saved data state was read with corpus_access {state['access']}, "
                        f"this run uses {access}; resume with the same data settings")
    if state.get("corpus") is not None and state["corpus"] not in (fingerprints or ()):
        raise DataError(f"{key}: the corpus differs from the one this data state was saved on (files, their "
                        "sizes or documents, or data.document_split/sentence_split changed; a state saved before "
                        "bert-recipes named corpora by layout also names the files' paths and times); resume with "
                        "the same data, or start a new run (overwrite=true or another output_dir)")
    rows = state.get("emits") == "rows"
    if rows != (cfg.packing is True):
        saved = "true (rows packed by the stream)" if rows else "false or batch (instances)"
        raise DataError(f"data.packing: the saved data state was written with data.packing {saved}, this run has "
                        f"{str(cfg.packing).lower()}; resume with data.packing="
                        + ("true (its stream keeps rows being packed)" if rows else "batch or false"))


class PretrainingStream(torch.utils.data.IterableDataset):
    """Masked NSP instances from ``files``, sharded, shuffled and resumable.

    Args:
        cfg: the :class:`~bert_recipes.recipe.DataConfig`.
        tokenizer: a fast BERT tokenizer ([CLS] [SEP] [MASK] [PAD] [UNK]).
        files: expanded local files; empty to stream ``cfg.dataset_name``.
        seed: determines document orders, instance building, masking and shuffling.
        rank, world_size: this process among the data-parallel ranks.
        infinite: cycle over the data forever; else stop after one pass.
        max_samples: stop after this many instances (split over DataLoader workers).
        with_origin: add ``a_document``, ``b_document`` (document ids: for indexed files
            the position in corpus order, files as given) and ``target_length``.
        key: the recipe key the files come from, for error messages.

    Yields:
        dicts with ``input_ids``, ``token_type_ids``, ``labels`` (lists of ints, length
        ``<= cfg.max_seq_length``; labels -100 where not masked) and
        ``next_sentence_label`` (0 = IsNext, 1 = random); with ``cfg.packing: true``, rows: lists
        of such dicts of at most ``cfg.max_seq_length`` tokens together.

    Raises:
        DataError: no source, all files empty, unreadable files, or a one-document corpus
            with next-sentence prediction (here); no text at all, or a shard without
            documents in an infinite stream (when a pass ends); a state saved with a
            different number of shards (on resume).
    """

    def __init__(self, cfg, tokenizer, files: list[str], *, seed: int, rank: int = 0, world_size: int = 1,
                 infinite: bool = True, max_samples: Optional[int] = None, with_origin: bool = False,
                 key: str = "data.train_files"):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        check_files(list(files), cfg, key)
        self.cfg, self.tokenizer, self.files, self.key = cfg, tokenizer, list(files), key
        self.seed, self.rank, self.world_size = int(seed), rank, world_size
        self.infinite, self.max_samples, self.with_origin = infinite, max_samples, with_origin
        self.vocab = MaskingVocab.from_tokenizer(tokenizer)
        self.builder = InstanceBuilder(
            max_seq_length=cfg.max_seq_length, short_seq_prob=cfg.short_seq_prob,
            random_next_prob=cfg.random_next_prob, cls_token_id=tokenizer.cls_token_id,
            sep_token_id=tokenizer.sep_token_id, short_seq_scope=cfg.short_seq_scope,
        )
        self._warned: set[str] = set()
        self.corpus: Optional[IndexedCorpus] = None
        if use_index(self.files, cfg):
            index = build_index(self.files, cfg, show_progress=None if rank == 0 else False)
            self.corpus = IndexedCorpus(index, tokenizer, cfg.text_column)
            self._check_index(index)
            self.source = IndexedSource(self.corpus, self.builder, self.seed, cfg.interleave_documents)
        else:
            backend = plain_backend(tokenizer)
            self.source = StreamedSource(self.files, cfg, self.builder, self.seed,
                                         lambda sentences: tokenize_sentences(tokenizer, sentences, backend=backend))
        self._pending: Optional[dict] = None
        self._live: Optional[_StreamState] = None

    def _check_index(self, index) -> None:
        """One-document corpora and single-sentence documents, reported before training."""
        check_document_count(index, self.cfg, self.key, self._where())
        if index.sentence_split == "line" and self.rank == 0:
            n = index.num_documents
            self._warn_single_sentence(index.single_unit_documents(), n, f"{n} documents in the corpus")

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

    def _fingerprint(self) -> Optional[str]:
        """The indexed corpus's identity (its layout: :func:`~.index.layout_fingerprint`), or None
        for a streamed source."""
        return self.corpus.index.fingerprint if self.corpus is not None else None

    def document_files(self) -> np.ndarray:
        """int ``[N]``: the file (position in ``files``) of each document id (indexed corpora)."""
        if self.corpus is None:
            raise ValueError("document ids map to files only for indexed corpora")
        return self.corpus.index.doc_file

    # ------------------------------------------------------------------ state

    def _fresh_state(self, shard: int, num_shards: int) -> _StreamState:
        rng = np.random.default_rng([self.seed & _SEED_MASK, shard, num_shards])
        return _StreamState(shard, num_shards, rng, self.source.new_position())

    def _restored_state(self, state: dict, shard: int, num_shards: int) -> _StreamState:
        if (state["shard"], state["num_shards"]) != (shard, num_shards):
            raise DataError(
                f"data.dataloader_num_workers: the saved data state is for shard {state['shard']} of "
                f"{state['num_shards']} (world_size x dataloader workers) but this run has shard {shard} of "
                f"{num_shards}; resume with the same world size and data.dataloader_num_workers"
            )
        st = self._fresh_state(shard, num_shards)
        st.rng.bit_generator.state = state["rng"]
        st.position = self.source.restore_position(state["source"])
        st.epoch, st.emitted = int(state["epoch"]), int(state["emitted"])
        st.stats = {**new_stats(), **state["stats"]}
        st.shuffle = [state["shuffle"][str(i)] for i in range(len(state["shuffle"]))]
        st.packer = {"window": list(state["packer"]["window"]), "ready": [list(row) for row in state["packer"]["ready"]]}
        return st

    def state_dict(self) -> dict:
        """The stream position (plain Python values; large values shared, not copied)."""
        st = self._live
        if st is None:
            return dict(self._pending) if self._pending else {"version": STATE_VERSION}
        return {
            "version": STATE_VERSION,
            "access": "index" if self.corpus is not None else "stream",
            "corpus": self._fingerprint(),
            "shard": st.shard,
            "num_shards": st.num_shards,
            "epoch": st.epoch,
            "emitted": st.emitted,
            "stats": dict(st.stats),
            "rng": st.rng.bit_generator.state,
            "source": self.source.position_state(st.position),
            "shuffle": {str(i): item for i, item in enumerate(st.shuffle)},
            "packer": {"window": list(st.packer["window"]), "ready": [list(row) for row in st.packer["ready"]]},
            "emits": self._emits(),
        }

    def _emits(self) -> str:
        """What the stream yields: "rows" (``data.packing: true``) or "instances" (false, batch)."""
        return "rows" if self.cfg.packing is True else "instances"

    def load_state_dict(self, state: dict) -> None:
        """Resume from :meth:`state_dict` at the next ``iter()`` (a state without position restarts).

        Raises:
            DataError: see :func:`check_saved_state`.
        """
        check_saved_state(state, self.cfg, self.corpus.index.fingerprints if self.corpus is not None else None,
                          self.key)
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
        instances = self._shuffled(st, self._limit())
        if self.cfg.packing is True:  # rows of instances (see packing.py); "batch": packed by the collator
            return pack_rows(instances, st.packer, self.cfg.max_seq_length, self.cfg.packing_window, st.rng)
        return instances

    def _shuffled(self, st: _StreamState, limit: Optional[int]) -> Iterator[dict]:
        """Instances through the shuffle buffer (``cfg.shuffle_buffer_size``, 0 = off)."""
        size = self.cfg.shuffle_buffer_size
        if limit is not None and st.emitted >= limit:
            return
        for item in self._instances(st):
            if size == 0:
                st.emitted += 1
                yield self._as_dict(item)
            elif len(st.shuffle) < size:
                st.shuffle.append(item)
                continue
            else:
                slot = int(st.rng.integers(size))
                out, st.shuffle[slot] = st.shuffle[slot], item
                st.emitted += 1
                yield self._as_dict(out)
            if limit is not None and st.emitted >= limit:
                return
        while st.shuffle and (limit is None or st.emitted < limit):  # finite stream: drain
            slot = int(st.rng.integers(len(st.shuffle)))
            out = st.shuffle[slot]
            st.shuffle[slot] = st.shuffle[-1]
            st.shuffle.pop()
            st.emitted += 1
            yield self._as_dict(out)

    def _as_dict(self, item: list) -> dict:
        out = {"input_ids": item[0], "token_type_ids": item[1], "labels": item[2], "next_sentence_label": item[3]}
        if self.with_origin:
            out["a_document"], out["b_document"], out["target_length"] = item[4]
        return out

    def _instances(self, st: _StreamState) -> Iterator[list]:
        """Masked instances, pass after pass; ``st`` is up to date before each yield."""
        while True:
            for pair in self.source.instances(st.position, st.rng, st.epoch, st.shard, st.num_shards, st.stats):
                st.stats["instances"] += 1
                self._early_checks(st)
                yield self._masked(pair, st.rng)
            self._end_pass(st)
            if not self.infinite:
                return
            st.epoch += 1
            st.position = self.source.new_position()
            st.stats = new_stats()

    def _masked(self, pair: PairInstance, rng: np.random.Generator) -> list:
        input_ids, labels = create_masked_lm_predictions(
            pair.input_ids, self.vocab, rng, masked_lm_prob=self.cfg.masked_lm_prob,
            max_predictions_per_seq=self.cfg.max_predictions_per_seq, whole_word_mask=self.cfg.whole_word_mask,
        )
        item = [input_ids.tolist(), pair.token_type_ids.tolist(), labels.tolist(), pair.next_sentence_label]
        if self.with_origin:
            item.append([pair.a_document, pair.b_document, pair.target_length])
        return item

    # ------------------------------------------------------------------ diagnostics

    def _where(self) -> str:
        return f"{len(self.files)} file(s)" if self.files else f"dataset '{self.cfg.dataset_name}'"

    def _warn_single_sentence(self, single: int, total: int, which: str) -> None:
        """``which`` completes "{single} of {which}", e.g. "40 documents in the corpus"."""
        if "single_sentence" in self._warned or not total or single / total < SINGLE_SENTENCE_WARN_SHARE:
            return
        self._warned.add("single_sentence")
        logger.warning(
            "data: %d of %s have a single sentence; as in google-research/bert they are used, but every instance "
            "from them is random-next (NSP label 1); check data.document_split / data.sentence_split", single, which,
        )

    def _early_checks(self, st: _StreamState) -> None:
        stats = st.stats
        if stats["with_text"] >= EARLY_CHECK_DOCUMENTS and st.shard == 0 and st.epoch == 0:
            self._warn_single_sentence(stats["single_sentence"], stats["with_text"],
                                       f"the first {stats['with_text']} documents read")
        if self.builder.skipped_chunks and "skipped" not in self._warned:
            self._warned.add("skipped")
            logger.warning("data: a one-sentence chunk had no other document with text to draw a random-next B segment "
                           "from (data shard %d of %d) and was skipped; add documents with text", st.shard, st.num_shards)

    def _end_pass(self, st: _StreamState) -> None:
        stats = st.stats
        if st.shard == 0:
            self._warn_single_sentence(stats["single_sentence"], stats["with_text"],
                                       f"{stats['with_text']} documents of data shard 0 ({self._where()})")
        if stats["instances"]:
            return
        streamed_all_empty = stats["documents"] == 0 or (stats["with_text"] == 0 and stats["owned"] == stats["documents"])
        if self.corpus is None and streamed_all_empty:
            raise DataError(f"{self.key}: no text to build pretraining instances from in {self._where()} "
                            f"({stats['documents']} document(s), all empty)")
        if self.infinite:
            total = self.corpus.num_documents if self.corpus is not None else stats["documents"]
            raise DataError(
                f"{self.key}: data shard {st.shard} of {st.num_shards} (world_size x dataloader workers) "
                f"got no text: {self._where()} hold {total} document(s), {stats['owned']} of them for this "
                "shard; use more documents (data.document_split) or fewer data.dataloader_num_workers"
            )


__all__ = ["PretrainingStream", "check_saved_state"]

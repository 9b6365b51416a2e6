"""Where a shard's documents come from, pass by pass: the two document sources of the stream.

:class:`IndexedSource` (local text / JSON Lines / parquet files; the default) follows
create_pretraining_data.py of google-research/bert over the whole corpus: pass ``p`` visits
every document once, in the permutation ``default_rng([seed, p]).permutation(N)`` of ALL
documents (Google shuffles ``all_documents``); with ``S`` shards (ranks x DataLoader
workers) shard ``s`` owns positions ``s, s + S, s + 2S, ...`` of that permutation and reads
only those documents (plus the B segments it draws). Random-next B is uniform over all
other documents of the corpus (:class:`~.reader.IndexedCorpus`). Instances are drawn from
``interleave_documents`` open documents at once (a uniformly random open document gives
the next instance), so a stream of book-length documents mixes books the way Google's
global instance shuffle does, before the shuffle buffer mixes further.

:class:`StreamedSource` (a Hub dataset, or files without random access: compressed, JSON
arrays; or ``corpus_access: stream``) is the approximation for sources that can only be
read front to back: each pass reads the files in a seeded order, shard ``s`` keeps the
documents whose enumeration index is ``s`` modulo ``S`` (every shard enumerates every
document), and random B comes from a bounded :class:`~.instances.RandomNextBuffer` of
recently read documents. See docs/data.md for its measured bias.

A source's per-pass position is a dict that :meth:`instances` updates before every yield;
``position_state(pos)`` turns it into plain values for a checkpoint (for the indexed
source: the permutation position and ``[document, sentence, target]`` per open document,
a few dozen ints; open documents are read again on resume) and ``restore_position`` back.
"""

from __future__ import annotations

from typing import Iterator, Optional

import numpy as np

from .corpus import RawDocument, iter_raw_documents
from .instances import DocumentCursor, InstanceBuilder, PairInstance, RandomNextBuffer
from .reader import IndexedCorpus

_SEED_MASK = (1 << 63) - 1


def new_stats() -> dict:
    """Per-pass counters: documents seen/owned/with text/single-sentence, instances."""
    return {"documents": 0, "owned": 0, "with_text": 0, "single_sentence": 0, "instances": 0}


class IndexedSource:
    """A shard's documents from the corpus-wide permutation (see the module docstring).

    Args:
        corpus: the :class:`~.reader.IndexedCorpus`.
        builder: the :class:`~.instances.InstanceBuilder`.
        seed: the run's seed (the permutation of pass ``p`` is seeded with ``(seed, p)``).
        interleave: open documents per shard (>= 1).
    """

    def __init__(self, corpus: IndexedCorpus, builder: InstanceBuilder, seed: int, interleave: int):
        self.corpus = corpus
        self.builder = builder
        self.seed = seed
        self.interleave = interleave

    def shard_documents(self, epoch: int, shard: int, num_shards: int) -> np.ndarray:
        """The documents shard ``shard`` of ``num_shards`` visits in pass ``epoch``, in order."""
        order = np.random.default_rng([self.seed & _SEED_MASK, epoch]).permutation(self.corpus.num_documents)
        return order[shard::num_shards]

    @staticmethod
    def new_position() -> dict:
        return {"position": 0, "open": []}

    @staticmethod
    def position_state(pos: dict) -> dict:
        opened = [[c.key, c.i, c.target] if isinstance(c, DocumentCursor) else list(c) for c in pos["open"]]
        return {"position": pos["position"], "open": opened}

    @staticmethod
    def restore_position(state: dict) -> dict:
        return {"position": int(state["position"]), "open": [list(c) for c in state["open"]]}

    def _open(self, doc: int, rng: np.random.Generator, stats: dict) -> Optional[DocumentCursor]:
        sentences = self.corpus.document(doc)
        stats["documents"] += 1
        stats["owned"] += 1
        if not sentences:
            return None
        stats["with_text"] += 1
        stats["single_sentence"] += len(sentences) == 1
        return self.builder.start(doc, sentences, rng)

    def _reopen(self, state: list) -> DocumentCursor:
        doc, i, target = (int(v) for v in state)
        return DocumentCursor(doc, self.corpus.document(doc), i, target)

    def instances(self, pos: dict, rng: np.random.Generator, epoch: int, shard: int, num_shards: int,
                  stats: dict) -> Iterator[PairInstance]:
        """The rest of the pass from ``pos`` (updated in place before every yield)."""
        order = self.shard_documents(epoch, shard, num_shards)
        cursors = [c if isinstance(c, DocumentCursor) else self._reopen(c) for c in pos["open"]]
        pos["open"] = cursors
        while True:
            while len(cursors) < self.interleave and pos["position"] < len(order):
                doc = int(order[pos["position"]])
                pos["position"] += 1
                cursor = self._open(doc, rng, stats)
                if cursor is not None:
                    cursors.append(cursor)
            if not cursors:
                return
            k = int(rng.integers(len(cursors))) if len(cursors) > 1 else 0
            pair = self.builder.next_instance(cursors[k], self.corpus, rng)
            if pair is None:
                cursors.pop(k)
            else:
                yield pair


class StreamedSource:
    """A shard's documents read front to back (see the module docstring).

    Args:
        files: local files (empty for ``cfg.dataset_name``).
        cfg: the :class:`~bert_recipes.recipe.DataConfig`.
        builder, seed: as for :class:`IndexedSource`.
        tokenize: ``tokenize(sentences) -> list[list[int]]`` (empty sentences dropped).
    """

    def __init__(self, files: list[str], cfg, builder: InstanceBuilder, seed: int, tokenize):
        self.files = files
        self.cfg = cfg
        self.builder = builder
        self.seed = seed
        self.tokenize = tokenize

    def new_position(self) -> dict:
        return {"file_position": 0, "file_first_index": 0, "next_document": 0, "current": None,
                "lookahead": None, "buffer": RandomNextBuffer(self.cfg.random_next_buffer_size,
                                                              self.cfg.max_seq_length - 3)}

    @staticmethod
    def position_state(pos: dict) -> dict:
        state = {key: pos[key] for key in ("file_position", "file_first_index", "next_document", "lookahead")}
        state["current"] = pos["current"].state_dict() if pos["current"] is not None else None
        state["random_next"] = pos["buffer"].state_dict()
        return state

    def restore_position(self, state: dict) -> dict:
        pos = self.new_position()
        pos.update({key: int(state[key]) for key in ("file_position", "file_first_index", "next_document")})
        pos["current"] = DocumentCursor.from_state(state["current"])
        pos["lookahead"] = state["lookahead"] or None
        pos["buffer"].load_state_dict(state["random_next"])
        return pos

    def _file_order(self, epoch: int) -> list[int]:
        rng = np.random.default_rng([self.seed & _SEED_MASK, epoch])
        return [int(i) for i in rng.permutation(len(self.files))]

    def _documents(self, pos: dict, epoch: int, shard: int, num_shards: int) -> Iterator[RawDocument]:
        return iter_raw_documents(
            self.files, self.cfg, order=self._file_order(epoch), start=pos["next_document"],
            start_file=pos["file_position"], start_file_index=pos["file_first_index"],
            keep=lambda index: index % num_shards == shard,
        )

    def _next_document(self, pos: dict, documents, buffer: RandomNextBuffer, rng, stats: dict) -> Optional[list]:
        """The shard's next non-empty document as ``[key, sentences]`` (entered into the
        random-next buffer), or None at the end of the pass."""
        for raw in documents:
            pos.update(next_document=raw.index + 1, file_position=raw.file_position,
                       file_first_index=raw.file_first_index)
            stats["documents"] += 1
            if raw.paragraphs is None:
                continue
            stats["owned"] += 1
            sentences = self.tokenize(raw.sentences(self.cfg.sentence_split))
            if not sentences:
                continue
            stats["with_text"] += 1
            stats["single_sentence"] += len(sentences) == 1
            buffer.add_document(raw.key, sentences, rng)
            return [raw.key, sentences]
        return None

    def instances(self, pos: dict, rng: np.random.Generator, epoch: int, shard: int, num_shards: int,
                  stats: dict) -> Iterator[PairInstance]:
        """The rest of the pass from ``pos``. The stream reads one document ahead, so even
        the first document of a shard has another document to draw B from."""
        buffer = pos["buffer"]
        documents = self._documents(pos, epoch, shard, num_shards)
        while True:
            if pos["current"] is not None:
                pair = self.builder.next_instance(pos["current"], buffer, rng)
                if pair is not None:
                    yield pair
                    continue
                pos["current"] = None
            if pos["lookahead"] is None:
                pos["lookahead"] = self._next_document(pos, documents, buffer, rng, stats)
            if pos["lookahead"] is None:
                return
            key, sentences = pos["lookahead"]
            pos["current"] = self.builder.start(key, sentences, rng)
            pos["lookahead"] = self._next_document(pos, documents, buffer, rng, stats)


__all__ = ["IndexedSource", "StreamedSource", "new_stats"]

"""Next-sentence-prediction instances, built on the fly; follows
create_instances_from_document and truncate_seq_pair of google-research/bert
(create_pretraining_data.py).

A document is a list of sentences, each a list of token ids. The builder walks it:

- ``max_num_tokens = max_seq_length - 3`` (room for [CLS] A [SEP] B [SEP]);
- ``target_seq_length = max_num_tokens``, or with probability ``short_seq_prob`` a random
  int in ``[2, max_num_tokens]``, drawn once when the document starts, as Google does
  (``short_seq_scope: document``); ``short_seq_scope: instance`` draws it again after
  every instance (a deliberate deviation for book-length documents);
- sentences accumulate into a chunk until ``target_seq_length`` tokens or the document end;
- ``a_end`` is uniform in ``[1, len(chunk) - 1]``; A = ``chunk[:a_end]``;
- B = ``chunk[a_end:]`` (``next_sentence_label`` 0, IsNext), or, with probability
  ``random_next_prob`` or when the chunk has one sentence, tokens from a *different*
  document starting at a random sentence (label 1); the unused sentences of the chunk are
  put back (``i -= num_unused_segments``);
- :func:`truncate_seq_pair` trims the longer segment, from the front or the back at random,
  until ``len(A) + len(B) <= max_num_tokens``. No instance ever exceeds ``max_seq_length``.

Random B segments come from a *source* with ``random_b(exclude, target_b_length, rng)``:
:class:`~.reader.IndexedCorpus` draws the document uniformly from the whole corpus (as
Google); for streams without random access (Hub datasets, compressed files) the
:class:`RandomNextBuffer` keeps a bounded sample of chunks from documents already read.
B never comes from A's document: when no other document exists, the chunk is skipped and
:attr:`InstanceBuilder.skipped_chunks` counts it (Google would use A's own document).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from typing import Optional

import numpy as np

# Google draws up to 10 random documents looking for one that differs from the current one.
RANDOM_DOCUMENT_TRIES = 10


def _removals(len_a: int, len_b: int, max_num_tokens: int) -> tuple[int, int]:
    """How many tokens Google's loop removes from A and from B (it trims the longer; B on ties)."""
    excess = len_a + len_b - max_num_tokens
    if excess <= 0:
        return 0, 0
    if len_a > len_b:  # trim A down to len_b; then B, A, B, ... alternately
        first = min(excess, len_a - len_b)
        rest = excess - first
        return first + rest // 2, rest - rest // 2
    first = min(excess, len_b - len_a + 1)  # trim B until it is shorter than A; then A, B, ...
    rest = excess - first
    return rest - rest // 2, first + rest // 2


def truncate_seq_pair(
    tokens_a: list[int], tokens_b: list[int], max_num_tokens: int, rng: np.random.Generator
) -> tuple[list[int], list[int]]:
    """Truncate a pair to at most ``max_num_tokens`` tokens in total (Google's truncate_seq_pair).

    Google removes one token at a time from the longer segment, from the front or the back
    with probability 1/2 each. The same distribution in O(1) draws: the number of removals
    per segment is deterministic, the number taken from the front is Binomial(n, 1/2).

    Returns:
        New lists ``(a, b)``; each keeps at least one token when ``max_num_tokens >= 2``.
    """
    remove_a, remove_b = _removals(len(tokens_a), len(tokens_b), max_num_tokens)
    if remove_a == remove_b == 0:
        return tokens_a, tokens_b
    front_a = int(rng.binomial(remove_a, 0.5)) if remove_a else 0
    front_b = int(rng.binomial(remove_b, 0.5)) if remove_b else 0
    return (
        tokens_a[front_a : len(tokens_a) - (remove_a - front_a)],
        tokens_b[front_b : len(tokens_b) - (remove_b - front_b)],
    )


def _take(sentences: list[list[int]], target: int) -> list[int]:
    """Sentences concatenated until at least ``target`` tokens (Google's B loop)."""
    tokens: list[int] = []
    for sentence in sentences:
        tokens.extend(sentence)
        if len(tokens) >= target:
            break
    return tokens


class RandomNextBuffer:
    """Bounded sample of token chunks from past documents, the source of random B segments.

    Each document adds ``round(tokens / max_num_tokens)`` entries (at least 1, at most half
    the capacity, so no single document can fill it), each a list of sentences starting at
    a random sentence and holding at most ``max_num_tokens`` tokens. Once full, a new entry
    replaces a uniformly random one. Entries are immutable ``[document_key, sentences]``
    lists, so a state dict can share them.
    """

    def __init__(self, capacity: int, max_num_tokens: int):
        self.capacity = capacity
        self.max_num_tokens = max_num_tokens
        self.entries: list[list] = []

    def _chunk(self, sentences: list[list[int]], start: int) -> list[list[int]]:
        chunk, total = [], 0
        for sentence in sentences[start:]:
            room = self.max_num_tokens - total
            chunk.append(sentence if len(sentence) <= room else sentence[:room])
            total += len(chunk[-1])
            if total >= self.max_num_tokens:
                break
        return chunk

    def add_document(self, key: int, sentences: list[list[int]], rng: np.random.Generator) -> None:
        """Sample entries from a tokenized document (non-empty list of non-empty sentences)."""
        tokens = sum(len(s) for s in sentences)
        count = min(max(1, round(tokens / self.max_num_tokens)), max(1, self.capacity // 2))
        for start in rng.integers(len(sentences), size=count):
            entry = [key, self._chunk(sentences, int(start))]
            if len(self.entries) < self.capacity:
                self.entries.append(entry)
            else:
                self.entries[int(rng.integers(self.capacity))] = entry

    def random_b(self, exclude_key: int, target_b_length: int,
                 rng: np.random.Generator) -> Optional[tuple[list[int], int]]:
        """``(tokens, document_key)`` of a random entry of another document, taking its
        sentences until ``target_b_length`` tokens; None when there is no other document."""
        if not self.entries:
            return None
        for _ in range(RANDOM_DOCUMENT_TRIES):
            key, sentences = self.entries[int(rng.integers(len(self.entries)))]
            if key != exclude_key:
                return _take(sentences, target_b_length), key
        others = [entry for entry in self.entries if entry[0] != exclude_key]
        if not others:
            return None
        key, sentences = others[int(rng.integers(len(others)))]
        return _take(sentences, target_b_length), key

    def state_dict(self) -> dict:
        """Entries by slot (``{"0": [key, sentences], ...}``), sharing the immutable entries."""
        return {str(slot): entry for slot, entry in enumerate(self.entries)}

    def load_state_dict(self, state: dict) -> None:
        self.entries = [state[str(slot)] for slot in range(len(state))]


@dataclass
class DocumentCursor:
    """A document being turned into instances: its key, sentences and the walk's position.

    ``i`` is the next sentence to read, ``target`` the current ``target_seq_length``.
    ``sentences`` is never modified.
    """

    key: int
    sentences: list[list[int]]
    i: int
    target: int

    def state_dict(self) -> dict:
        return {"key": self.key, "sentences": self.sentences, "i": self.i, "target": self.target}

    @classmethod
    def from_state(cls, state: Optional[dict]) -> Optional["DocumentCursor"]:
        if not state:
            return None
        return cls(int(state["key"]), state["sentences"], int(state["i"]), int(state["target"]))


@dataclass
class PairInstance:
    """An unmasked NSP instance.

    Attributes:
        input_ids: int64 ``[L]``: ``[CLS] A [SEP] B [SEP]``, ``L <= max_seq_length``.
        token_type_ids: int64 ``[L]``: 0 for ``[CLS] A [SEP]``, 1 for ``B [SEP]``.
        next_sentence_label: 0 when B follows A in the document, 1 when B is random.
        a_document, b_document: the documents of A and B (equal for IsNext).
        target_length: the ``target_seq_length`` the instance was built under.
    """

    input_ids: np.ndarray
    token_type_ids: np.ndarray
    next_sentence_label: int
    a_document: int = -1
    b_document: int = -1
    target_length: int = 0


class InstanceBuilder:
    """Turns tokenized documents into NSP instances, one at a time (resumable).

    Args:
        max_seq_length: longest instance, special tokens included (>= 5).
        short_seq_prob: probability of a shorter random target length.
        random_next_prob: probability of a random B (Google: 0.5).
        cls_token_id, sep_token_id: the tokenizer's [CLS] and [SEP] ids.
        short_seq_scope: ``document`` (Google: one target per document) or ``instance``.
    """

    def __init__(self, *, max_seq_length: int, short_seq_prob: float, random_next_prob: float,
                 cls_token_id: int, sep_token_id: int, short_seq_scope: str = "document"):
        self.max_num_tokens = max_seq_length - 3
        self.short_seq_prob = short_seq_prob
        self.random_next_prob = random_next_prob
        self.cls_token_id = cls_token_id
        self.sep_token_id = sep_token_id
        self.per_instance = short_seq_scope == "instance"
        self.skipped_chunks = 0

    def target_length(self, rng: np.random.Generator) -> int:
        """``max_num_tokens``, or with probability ``short_seq_prob`` uniform in ``[2, max_num_tokens]``."""
        if rng.random() < self.short_seq_prob:
            return int(rng.integers(2, self.max_num_tokens + 1))
        return self.max_num_tokens

    def start(self, key: int, sentences: list[list[int]], rng: np.random.Generator) -> DocumentCursor:
        """A cursor at the first sentence of a document (non-empty sentences only); draws its target."""
        return DocumentCursor(key, sentences, 0, self.target_length(rng))

    def next_instance(self, cursor: DocumentCursor, source, rng: np.random.Generator) -> Optional[PairInstance]:
        """The next instance of the document, advancing ``cursor``; None at the document end.

        ``source.random_b(exclude, target_b_length, rng)`` gives random-next B segments.
        """
        doc = cursor.sentences
        while cursor.i < len(doc):
            first, length = cursor.i, 0
            while cursor.i < len(doc):
                length += len(doc[cursor.i])
                if cursor.i == len(doc) - 1 or length >= cursor.target:
                    break
                cursor.i += 1
            instance, unused = self._pair(doc[first : cursor.i + 1], cursor, source, rng)
            cursor.i += 1 - unused
            if self.per_instance:
                cursor.target = self.target_length(rng)
            if instance is not None:
                return instance
        return None

    def _pair(self, chunk: list[list[int]], cursor: DocumentCursor, source,
              rng: np.random.Generator) -> tuple[Optional[PairInstance], int]:
        a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
        tokens_a = list(chain.from_iterable(chunk[:a_end]))
        if len(chunk) == 1 or rng.random() < self.random_next_prob:
            drawn = source.random_b(cursor.key, cursor.target - len(tokens_a), rng)
            if drawn is None:  # no other document: never a "random" B from A's own document
                self.skipped_chunks += 1
                return None, 0
            tokens_b, b_document = drawn
            label, unused = 1, len(chunk) - a_end
        else:
            tokens_b, b_document = list(chain.from_iterable(chunk[a_end:])), cursor.key
            label, unused = 0, 0
        tokens_a, tokens_b = truncate_seq_pair(tokens_a, tokens_b, self.max_num_tokens, rng)
        pair = self._assemble(tokens_a, tokens_b, label)
        pair.a_document, pair.b_document, pair.target_length = cursor.key, b_document, cursor.target
        return pair, unused

    def _assemble(self, tokens_a: list[int], tokens_b: list[int], label: int) -> PairInstance:
        length = len(tokens_a) + len(tokens_b) + 3
        ids = np.empty(length, dtype=np.int64)
        ids[0] = self.cls_token_id
        ids[1 : 1 + len(tokens_a)] = tokens_a
        ids[1 + len(tokens_a)] = self.sep_token_id
        ids[2 + len(tokens_a) : -1] = tokens_b
        ids[-1] = self.sep_token_id
        types = np.zeros(length, dtype=np.int64)
        types[2 + len(tokens_a) :] = 1
        return PairInstance(ids, types, label)


__all__ = ["DocumentCursor", "InstanceBuilder", "PairInstance", "RandomNextBuffer", "truncate_seq_pair"]

"""Random access to the documents of an indexed corpus: text, sentences, token ids, and
random-next B segments drawn over the whole corpus.

:class:`IndexedCorpus` reads a document by its position in the :class:`~.index.DocumentIndex`
(``os.pread`` of its byte range, or its parquet row), splits it into sentences
(``sentence_split``: Punkt on each paragraph, or one sentence per line as Google's input
format) and tokenizes it. :meth:`IndexedCorpus.random_b` follows create_instances_from_document
of google-research/bert: the random document is uniform over all documents other than A's
(Google draws up to 10 times and may end on A's own document; here it never does), and B
starts at a random sentence of it and takes sentences until ``target_b_length`` tokens.
Only the units B needs are read.

Sentence starts: with ``sentence_split: line`` and for records (JSON Lines, parquet) the
start is uniform over the document's sentences, as Google's. For Punkt-split text the
paragraph is drawn in proportion to its bytes and the sentence uniformly within it (the
sentence count of a paragraph is unknown without running Punkt on the whole document).

``bytes_read`` counts the bytes requested from the files, split into ``own`` (documents
read as A) and ``random_next`` (B segments), for the sharding benchmark.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Optional

import numpy as np

from ..errors import DataError
from .corpus import file_kind, split_sentences, text_pieces
from .index import DocumentIndex, bad_record, json_record

_OPEN_FILES = 64
# English WordPiece: about 4-5 bytes of text per token; random-next B reads lines in runs of
# about this many bytes per token still needed (then more if the run falls short)
BYTES_PER_TOKEN = 5
# sentences of a B segment are tokenized this many at a time, stopping once B is long enough
TOKENIZE_AHEAD = 8
# random-next documents drawn before giving up on a B: 10 gave up now and then on JSON Lines whose
# records are a third null (found by a helper); drawing a document with text ends the loop at once
RANDOM_B_DRAWS = 100


def plain_backend(tokenizer):
    """A private copy of a fast tokenizer's Rust backend with padding and truncation off
    (a saved tokenizer.json may enable both), or None for a slow tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def tokenize_sentences(tokenizer, sentences: list[str], backend=None) -> list[list[int]]:
    """Token ids per sentence in one batched call, empty ones dropped. With ``backend``
    (:func:`plain_backend`) the Rust tokenizer is called
    directly (the transformers wrapper costs more than the tokenization itself for short
    batches); the ids are the same."""
    if not sentences:
        return []
    if backend is not None:
        encoded = [e.ids for e in backend.encode_batch(sentences, add_special_tokens=False)]
    else:
        encoded = tokenizer(sentences, add_special_tokens=False, return_attention_mask=False,
                            return_token_type_ids=False, verbose=False)["input_ids"]
    return [ids for ids in encoded if ids]


def unit_sentences(text: str, sentence_split: str) -> list[str]:
    """Sentences of one unit's text: Punkt on each paragraph, or one per non-blank line."""
    if sentence_split == "line":  # a "sentence" longer than PUNKT_MAX_CHARS is cut at spaces, as Punkt input is
        return [piece for line in text.split("\n") if line.strip() for piece in text_pieces(" ".join(line.split()))]
    return split_sentences(text)


class IndexedCorpus:
    """Documents of an indexed corpus, read by position (see the module docstring).

    Args:
        index: the corpus's :class:`~.index.DocumentIndex`.
        tokenizer: a BERT tokenizer (fast or slow; called on lists of sentences).
        text_column: the column of JSON Lines / parquet records.
    """

    def __init__(self, index: DocumentIndex, tokenizer, text_column: str = "text"):
        self.index = index
        self.tokenizer = tokenizer
        self.text_column = text_column
        self.kinds = [file_kind(path) for path in index.files]
        self.bytes_read = {"own": 0, "random_next": 0}
        self._backend = plain_backend(tokenizer)
        self._fds: OrderedDict = OrderedDict()
        self._row_groups: OrderedDict = OrderedDict()
        self._parquet: dict = {}  # file number -> pyarrow ParquetFile (its metadata read once)

    def __getstate__(self):  # DataLoader workers (spawn) reopen their own files
        state = dict(self.__dict__)
        state["_fds"], state["_row_groups"], state["_parquet"] = OrderedDict(), OrderedDict(), {}
        return state

    @property
    def num_documents(self) -> int:
        return self.index.num_documents

    # ------------------------------------------------------------------ reading

    def _fd(self, number: int) -> int:
        fd = self._fds.pop(number, None)
        if fd is None:
            if len(self._fds) >= _OPEN_FILES:
                os.close(self._fds.popitem(last=False)[1])
            fd = os.open(self.index.files[number], os.O_RDONLY)
        self._fds[number] = fd
        return fd

    def _read(self, number: int, start: int, end: int, purpose: str) -> bytes:
        self.bytes_read[purpose] += end - start
        data = os.pread(self._fd(number), end - start, start)
        if len(data) != end - start:
            raise DataError(f"data.train_files: {self.index.files[number]} changed while training (it is shorter than "
                            "its index); restore it or start a new run")
        return data

    def _record(self, number: int, raw: bytes, start: int) -> str:
        """The text column of the JSON Lines record at byte ``start`` of file ``number``.

        Raises:
            DataError: the record is not a JSON object, or its column holds no text (naming its line).
        """
        try:  # a record without the column is null text, as `datasets` reads it (the tokenizer's trainer)
            record = json_record(raw, self.text_column)
        except ValueError:
            path = self.index.files[number]
            with open(path, "rb") as f:  # only on the error path: the line number of the record
                line = f.read(start).count(b"\n") + 1
            raise bad_record(path, line, self.text_column) from None
        value = record.get(self.text_column) if record else None
        return value or ""

    def _row(self, number: int, row: int, purpose: str) -> str:
        import pyarrow.parquet as pq

        if number not in self._parquet:
            self._parquet[number] = pq.ParquetFile(self.index.files[number])
        parquet = self._parquet[number]
        meta = parquet.metadata
        group, first = 0, 0
        while first + meta.row_group(group).num_rows <= row:
            first += meta.row_group(group).num_rows
            group += 1
        key = (number, group)
        column = self._row_groups.pop(key, None)
        if column is None:
            self.bytes_read[purpose] += meta.row_group(group).total_byte_size
            column = parquet.read_row_group(group, columns=[self.text_column]).column(0).to_pylist()
            if len(self._row_groups) >= 2:
                self._row_groups.popitem(last=False)
        self._row_groups[key] = column
        value = column[row - first]
        return value or ""  # a string column (checked by the index)

    def unit_texts(self, first: int, last: int, purpose: str = "own") -> list[str]:
        """Texts of the units ``[first, last)`` of one document (one read for text files)."""
        index = self.index
        number = int(index.doc_file[np.searchsorted(index.doc_units, first, side="right") - 1])
        kind = self.kinds[number]
        if kind == "parquet":
            return [self._row(number, int(index.unit_start[u]), purpose) for u in range(first, last)]
        base = int(index.unit_start[first])
        data = self._read(number, base, int(index.unit_end[last - 1]), purpose)
        pieces = [data[int(index.unit_start[u]) - base : int(index.unit_end[u]) - base] for u in range(first, last)]
        if kind == "json":
            return [self._record(number, piece, int(index.unit_start[u]))
                    for u, piece in zip(range(first, last), pieces)]
        return [piece.decode("utf-8", "replace") for piece in pieces]

    def sentences(self, doc: int) -> list[str]:
        """The sentences of a document, in order."""
        first, last = self.index.units_of(doc)
        split = self.index.sentence_split
        return [s for text in self.unit_texts(first, last) for s in unit_sentences(text, split)]

    def tokenize(self, sentences: list[str]) -> list[list[int]]:
        """Token ids per sentence (one batched call), empty ones dropped."""
        return tokenize_sentences(self.tokenizer, sentences, backend=self._backend)

    def document(self, doc: int) -> list[list[int]]:
        """The token ids of a document's sentences (empty sentences dropped)."""
        return self.tokenize(self.sentences(doc))

    # ------------------------------------------------------------------ random next

    def random_document(self, exclude: int, rng: np.random.Generator) -> Optional[int]:
        """A document uniform over all documents but ``exclude`` (None in a one-document corpus)."""
        n = self.num_documents
        if n < 2:
            return None
        doc = int(rng.integers(n - 1))
        return doc + (doc >= exclude)

    def _start_unit(self, first: int, last: int, rng: np.random.Generator) -> int:
        if last - first == 1:
            return first
        if self.index.sentence_split == "line":
            return first + int(rng.integers(last - first))
        sizes = np.cumsum(self.index.unit_end[first:last] - self.index.unit_start[first:last])
        return first + int(np.searchsorted(sizes, rng.random() * sizes[-1], side="right"))

    def random_b(self, exclude: int, target_b_length: int,
                 rng: np.random.Generator) -> Optional[tuple[list[int], int]]:
        """``(tokens, document)``: a random-next B segment of at least ``target_b_length``
        tokens (fewer at the document's end) from a random other document; None when the
        corpus has one document."""
        for _ in range(RANDOM_B_DRAWS):  # a B whose text tokenizes to nothing (a null record) is drawn again
            doc = self.random_document(exclude, rng)
            if doc is None:
                return None
            tokens = self._tokens_from(doc, target_b_length, rng)
            if tokens:
                return tokens, doc
        return None

    def _tokens_from(self, doc: int, target_b_length: int, rng: np.random.Generator) -> list[int]:
        """Google's B loop from a random sentence of ``doc``: whole sentences until at least
        ``target_b_length`` tokens (at least one sentence). Units are read a few at a time,
        about as many bytes as the tokens still needed."""
        first, last = self.index.units_of(doc)
        unit = self._start_unit(first, last, rng)
        tokens: list[int] = []
        start_drawn = False
        while unit < last and (not tokens or len(tokens) < target_b_length):  # at least one sentence (Google)
            end = self._read_ahead(unit, last, target_b_length - len(tokens))
            for text in self.unit_texts(unit, end, "random_next"):
                sentences = unit_sentences(text, self.index.sentence_split)
                if not start_drawn:
                    if not sentences:
                        continue
                    sentences = sentences[int(rng.integers(len(sentences))):]
                    start_drawn = True
                for i in range(0, len(sentences), TOKENIZE_AHEAD):  # tokenize only what B uses
                    for sentence in tokenize_sentences(self.tokenizer, sentences[i : i + TOKENIZE_AHEAD],
                                                       backend=self._backend):
                        tokens.extend(sentence)
                        if len(tokens) >= target_b_length:
                            return tokens
            unit = end
        return tokens

    def _read_ahead(self, unit: int, last: int, tokens_needed: int) -> int:
        """The end of a run of units from ``unit`` holding about ``tokens_needed`` tokens."""
        if self.index.sentence_split != "line" or last - unit == 1:
            return unit + 1
        budget = max(tokens_needed, 1) * BYTES_PER_TOKEN
        ends = self.index.unit_end[unit:last]  # a view: O(log units) per B segment, not O(units)
        return unit + 1 + min(int(np.searchsorted(ends, int(self.index.unit_start[unit]) + budget)), last - unit - 1)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


__all__ = ["IndexedCorpus", "plain_backend", "tokenize_sentences", "unit_sentences"]

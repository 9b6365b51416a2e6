"""Documents from files or the Hub, read with `datasets` streaming; sentence splitting.

A *document* is what google-research/bert's create_pretraining_data.py calls one: the
unit that next-sentence prediction must not cross. Boundaries come from
``DataConfig.document_split``:

- ``file``: one document per file;
- ``blank_line``: blank-line separated blocks are documents;
- ``record``: one document per json/parquet record (for text files: like ``blank_line``);
- ``auto``: ``record`` for json/parquet (and the Hub), ``blank_line`` for text.

``document_start_regex`` additionally starts a new document at every matching line (e.g.
WikiText's article headings ``^ = [^=].* = $``). Inside a document, blank lines separate
paragraphs; the hard-wrapped lines of a paragraph are joined with spaces and the paragraph
is split into sentences with nltk's Punkt (the untrained ``PunktSentenceTokenizer()``,
which needs no data download).

Text files are read with ``load_dataset("text", sample_by="paragraph",
encoding_errors="replace")``: memory stays bounded by a paragraph (or a document in
``file`` mode), invalid UTF-8 bytes become U+FFFD instead of an error, and ``\\r\\n`` line
ends are normalised. Each file is loaded on its own so that file boundaries are known.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from ..errors import DataError
from ..recipe_files import COMPRESSION_SUFFIXES

# Punkt's regexes run under nltk's ReDoS timeout (5 s for a whole call); its cost grows with
# the number of '.', '?' and '!' (about 50 us each), so very long paragraphs (e.g. a 1 MB
# line) are cut into pieces of at most this many characters, at a space when there is one.
PUNKT_MAX_CHARS = 100_000

_JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")

_punkt = None


def _sentence_tokenizer():
    global _punkt
    if _punkt is None:
        from nltk.tokenize.punkt import PunktSentenceTokenizer

        _punkt = PunktSentenceTokenizer()
    return _punkt


def text_pieces(text: str, limit: int = PUNKT_MAX_CHARS) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``limit`` characters, preferring spaces."""
    while len(text) > limit:
        cut = text.rfind(" ", limit // 2, limit)
        cut = limit if cut < 0 else cut
        yield text[:cut]
        text = text[cut:].lstrip()
    if text:
        yield text


def _join(lines: list[str]) -> str:
    """Join lines with single spaces (whitespace runs collapsed)."""
    return " ".join(" ".join(lines).split())


def split_paragraphs(text: str) -> list[str]:
    """Split text at blank lines; join each block's lines with single spaces.

    Returns the non-empty paragraphs with whitespace runs collapsed to one space.
    """
    paragraphs, lines = [], []
    for line in text.split("\n"):
        if line.strip():
            lines.append(line)
        elif lines:
            paragraphs.append(_join(lines))
            lines = []
    if lines:
        paragraphs.append(_join(lines))
    return paragraphs


def split_sentences(text: str) -> list[str]:
    """Split text into sentences: paragraphs at blank lines, then nltk Punkt.

    Hard-wrapped lines are joined with spaces first, so a sentence may span lines but never
    a blank line. Returns stripped, non-empty sentences in order; an empty or whitespace-only
    text gives ``[]``. Never raises on long input (see ``PUNKT_MAX_CHARS``).
    """
    punkt = _sentence_tokenizer()
    sentences = []
    for paragraph in split_paragraphs(text):
        for piece in text_pieces(paragraph):
            sentences.extend(s.strip() for s in punkt.tokenize(piece) if s.strip())
    return sentences


# --------------------------------------------------------------------------- sources


def file_kind(path: str) -> str:
    """``"json"``, ``"parquet"`` or ``"text"``, from the file name (compression suffix ignored)."""
    name = path.lower()
    for suffix in COMPRESSION_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    if name.endswith(_JSON_SUFFIXES):
        return "json"
    if name.endswith(".parquet"):
        return "parquet"
    return "text"


def resolve_document_split(mode: str, kind: str) -> str:
    """The effective split for a source kind: ``auto`` -> ``record`` or ``blank_line``."""
    if mode == "auto":
        return "blank_line" if kind == "text" else "record"
    if mode == "record" and kind == "text":
        return "blank_line"
    return mode


def compile_document_start(pattern: Optional[str]) -> Optional[re.Pattern]:
    """Compile ``data.document_start_regex``; raises :class:`DataError` when invalid."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DataError(f"data.document_start_regex: invalid regular expression {pattern!r}: {exc}") from None


def _load_streaming(*args, **kwargs):
    from datasets import load_dataset

    return load_dataset(*args, streaming=True, **kwargs)


# Records are read in batches with the public ``IterableDataset.iter``: plain iteration
# would, inside a DataLoader worker, shard the *files* over the workers by itself, while
# this project shards *documents* (see loader.py).
RECORD_BATCH = 64


def _iter_column(dataset, column: str, where: str) -> Iterator[str]:
    for number, batch in enumerate(dataset.iter(batch_size=RECORD_BATCH)):
        if column not in batch:  # records without it are null text (as in index.scan_jsonl)
            if number:
                continue
            raise DataError(f"data.text_column: column '{column}' not found in {where} (columns: {', '.join(batch)})")
        for text in batch[column]:
            if text and not isinstance(text, str):  # a list, a number: its repr was trained on (found by a helper)
                raise DataError(f"data.text_column: column '{column}' of {where} holds {type(text).__name__} values, "
                                "expected text (strings); point data.text_column at the text column")
            if text:
                yield text


def iter_records(path: str, text_column: str) -> Iterator[str]:
    """Raw text records of one file via `datasets` streaming.

    Text files yield blank-line separated blocks (``sample_by="paragraph"``, invalid bytes
    replaced); json/parquet files yield ``text_column`` of each record (empty and
    ``None`` skipped). An empty (0-byte) file yields nothing.

    Raises:
        DataError: the file cannot be parsed, or lacks ``text_column``.
    """
    kind = file_kind(path)
    if os.path.getsize(path) == 0:
        return
    try:  # datasets may parse the first rows already when loading (a type change, then a bad line)
        if kind == "text":
            dataset = _load_streaming("text", data_files=[path], split="train", sample_by="paragraph",
                                      encoding_errors="replace")
            column = "text"
        else:
            dataset = _load_streaming(kind, data_files=[path], split="train")
            column = text_column
        yield from _iter_column(dataset, column, path)
    except DataError:
        raise
    except Exception as exc:  # pyarrow / json errors: one line naming the file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(f"data.train_files: cannot read {path} as {kind}: {exc.__class__.__name__}: {first}") from None


def iter_hub_records(cfg, split: str) -> Iterator[str]:
    """``cfg.text_column`` of each record of a Hub dataset, streamed (needs network access)."""
    try:
        dataset = _load_streaming(cfg.dataset_name, cfg.dataset_config_name, split=split)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise DataError(f"data.dataset_name: cannot load '{cfg.dataset_name}' split '{split}': {first}") from None
    yield from _iter_column(dataset, cfg.text_column, f"dataset '{cfg.dataset_name}'")


# --------------------------------------------------------------------------- documents


def group_documents(records: Iterator[str], mode: str, start: Optional[re.Pattern],
                    per_line: bool = False) -> Iterator[list[str]]:
    """Group raw records into documents, each a list of paragraphs (lines joined by spaces;
    with ``per_line``, every line is a paragraph of its own: ``sentence_split: line``).

    ``mode`` is an effective split (``file``, ``blank_line`` or ``record``). A blank line
    ends a paragraph (and, in ``blank_line`` mode, a document); the end of a record ends a
    paragraph (and, unless in ``file`` mode, a document). A line matching ``start`` begins
    a new document and is a paragraph of its own (a heading). Documents without text are
    dropped, except in ``file`` mode without ``start``, where the file is always exactly
    one document (possibly empty) so that document indices never depend on file contents.
    """
    doc: list[str] = []
    for record in records:
        lines: list[str] = []
        for line in record.split("\n"):
            if not line.strip():
                if lines:
                    doc.append(_join(lines))
                    lines = []
                if mode == "blank_line" and doc:
                    yield doc
                    doc = []
            elif start is not None and start.search(line):
                if lines:
                    doc.append(_join(lines))
                    lines = []
                if doc:
                    yield doc
                doc = [_join([line])]
            elif per_line:
                doc.append(_join([line]))
            else:
                lines.append(line)
        if lines:
            doc.append(_join(lines))
        if mode != "file" and doc:
            yield doc
            doc = []
    if doc or (mode == "file" and start is None):
        yield doc


@dataclass
class RawDocument:
    """A document before sentence splitting.

    Attributes:
        index: position in the pass's document enumeration (0, 1, ...), used for sharding.
        key: a stable id across passes: ``file_number << 32 | ordinal within the file``.
        paragraphs: the paragraphs, or ``None`` for a document another shard handles.
        file_position: position of its file in the pass's file order.
        file_first_index: ``index`` of the first document of that file (for resuming).
    """

    index: int
    key: int
    paragraphs: Optional[list[str]]
    file_position: int = 0
    file_first_index: int = 0

    def sentences(self, sentence_split: str = "punkt") -> list[str]:
        """The document's sentences: Punkt on each paragraph, or (``line``) one per line."""
        if sentence_split == "line":
            return list(self.paragraphs or ())
        return [s for p in self.paragraphs or () for s in split_sentences(p)]


def _sources(files: list[str], cfg, order: Optional[list[int]], hub_split: Optional[str]):
    """``(file_number, read_records, effective_split)`` per source, in order."""
    if not files:
        mode = resolve_document_split(cfg.document_split, "hub")
        return [(0, lambda: iter_hub_records(cfg, hub_split or cfg.dataset_split), mode)]
    order = list(range(len(files))) if order is None else order
    return [
        (n, (lambda p=files[n]: iter_records(p, cfg.text_column)), resolve_document_split(cfg.document_split, file_kind(files[n])))
        for n in order
    ]


def iter_raw_documents(
    files: list[str],
    cfg,
    *,
    order: Optional[list[int]] = None,
    start: int = 0,
    start_file: int = 0,
    start_file_index: int = 0,
    keep: Callable[[int], bool] = lambda index: True,
    hub_split: Optional[str] = None,
) -> Iterator[RawDocument]:
    """Enumerate the documents of ``files`` (taken in ``order``) or of ``cfg.dataset_name``.

    Args:
        files: local files (already expanded); empty to stream ``cfg.dataset_name``.
        cfg: the :class:`~bert_recipes.recipe.DataConfig`.
        order: permutation of ``range(len(files))``; default: as given.
        start: documents with a smaller index are passed over (resume).
        start_file, start_file_index: begin reading at this position of ``order``, whose
            first document has index ``start_file_index`` (resume without re-reading the
            files before it).
        keep: ``keep(index)`` is False for documents another shard handles: they are
            yielded with ``paragraphs=None`` (in ``file`` mode without a start regex their
            file is not even read).
        hub_split: the Hub split to stream (default ``cfg.dataset_split``).

    Yields:
        :class:`RawDocument` for every document with ``index >= start``.
    """
    start_re = compile_document_start(cfg.document_start_regex)
    per_line = cfg.sentence_split == "line"
    index = start_file_index
    for position, (number, read, mode) in enumerate(_sources(files, cfg, order, hub_split)):
        if position < start_file:
            continue
        first = index
        if mode == "file" and start_re is None:  # exactly one document per file: read only if kept
            if index >= start:
                paragraphs = ([p for doc in group_documents(read(), mode, None, per_line) for p in doc]
                              if keep(index) else None)
                yield RawDocument(index, number << 32, paragraphs, position, first)
            index += 1
            continue
        for ordinal, paragraphs in enumerate(group_documents(read(), mode, start_re, per_line)):
            if index >= start:
                yield RawDocument(index, number << 32 | ordinal, paragraphs if keep(index) else None, position, first)
            index += 1


def iter_documents(files: list[str], cfg, **kwargs) -> Iterator[list[str]]:
    """Documents of ``files`` (or ``cfg.dataset_name``) as lists of sentences, in file order.

    Empty documents are skipped. ``kwargs`` go to :func:`iter_raw_documents`.
    """
    for raw in iter_raw_documents(files, cfg, **kwargs):
        sentences = raw.sentences(cfg.sentence_split)
        if sentences:
            yield sentences


__all__ = [
    "PUNKT_MAX_CHARS",
    "RawDocument",
    "compile_document_start",
    "file_kind",
    "group_documents",
    "iter_documents",
    "iter_raw_documents",
    "iter_records",
    "resolve_document_split",
    "split_paragraphs",
    "split_sentences",
]

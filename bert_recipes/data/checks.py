"""The checks on pretraining data that need no tokenizer: what a preflight runs before
anything is written, and what :class:`~.stream.PretrainingStream` runs when it starts."""

from __future__ import annotations

import logging
import os
from typing import Optional

from ..errors import DataError
from .index import build_index, random_access_problem

logger = logging.getLogger("bert_recipes")


def check_files(files: list[str], cfg, key: str = "data.train_files") -> None:
    """Raise :class:`DataError` when there is no source, or every file is empty (0 bytes)."""
    if not files and not cfg.dataset_name:
        raise DataError(f"{key}: no files to read (and no data.dataset_name)")
    if files and all(os.path.getsize(f) == 0 for f in files):
        raise DataError(f"{key}: all {len(files)} file(s) are empty (e.g. {files[0]})")


def use_index(files: list[str], cfg) -> bool:
    """Whether ``files`` are read by position (see the module docstring).

    Raises:
        DataError: ``corpus_access: index`` for a source that cannot be read by position.
    """
    if cfg.corpus_access == "stream":
        return False
    problems = ["a Hub dataset"] if not files else [f"{p} {why}" for p in files if (why := random_access_problem(p))]
    if not problems:
        return True
    if cfg.corpus_access == "index":
        raise DataError(f"data.corpus_access: index needs local uncompressed text, JSON Lines or parquet files, but "
                        f"{problems[0]}; decompress it / convert it to JSON Lines, or use corpus_access: stream")
    if problems[0] not in _SAID:  # the preflight asks too: one line
        _SAID.add(problems[0])
        logger.info("data: streaming front to back (random-next B from a buffer of recent documents): %s", problems[0])
    return False


_SAID: set = set()  # the reasons use_index logged in this process


def check_document_count(index, cfg, key: str, where: str) -> None:
    """Refuse a corpus without documents, or of one document with next-sentence prediction.

    Raises:
        DataError: naming ``key`` and the fix.
    """
    n = index.num_documents
    if n == 0:
        raise DataError(f"{key}: no text to build pretraining instances from in {where} (all blank)")
    if n == 1 and cfg.random_next_prob > 0:
        fix = ("cut it into documents (data.document_start_regex, or data.document_split: blank_line for "
               "blank-line separated documents)" if cfg.document_split == "file" else
               "cut it into documents (data.document_start_regex) or add documents")
        raise DataError(f"{key}: the corpus is one document, so next-sentence prediction has no other document for "
                        f"random-next B segments; {fix}, or set data.random_next_prob=0 (IsNext pairs only)")


def check_corpus(cfg, files: list[str], key: str = "data.train_files") -> Optional[tuple[str, str]]:
    """The checks a :class:`PretrainingStream` makes before reading, without a tokenizer (a
    preflight): files present and not all empty, the index buildable (it is cached for the
    run), more than one document for NSP.

    Returns:
        The fingerprints a saved data state of this corpus may name (its layout's, and its
        files' paths and times as earlier versions saved), or None for a corpus read as a stream.

    Raises:
        DataError: naming ``key``, the file and the fix.
    """
    check_files(files, cfg, key)
    if not use_index(files, cfg):
        return None
    index = build_index(files, cfg, show_progress=False)
    check_document_count(index, cfg, key, f"{len(files)} file(s)")
    return index.fingerprints


__all__ = ["check_corpus", "check_document_count", "check_files", "use_index"]

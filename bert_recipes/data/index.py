"""Document index: where every document of a local corpus is, found by a cheap byte scan.

The index is what lets the stream follow google-research/bert's create_pretraining_data.py
at corpus scale without holding the corpus in memory: each pass visits all documents in
one seeded permutation of the whole corpus (Google shuffles ``all_documents``), each shard
reads only its own documents by position, and a random-next B segment is drawn uniformly
from all other documents, whichever shard owns them.

Units and documents. A file is scanned once, bytes only (no decoding except for
``document_start_regex`` lines, no sentence splitting, no tokenization), into *units*:

- text files, ``sentence_split: line`` (Google's format): every non-blank line is a unit
  (one sentence);
- text files, ``sentence_split: punkt``: every paragraph (a block of non-blank lines) is a
  unit; a line matching ``document_start_regex`` is a unit of its own (a heading);
- JSON Lines: every non-blank line (one record) is a unit and a document;
- parquet: every row is a unit and a document (``unit_start`` holds the row number).

Documents are runs of units: ``blank_line`` starts a document after every blank line,
``file`` makes the file one document, and ``document_start_regex`` also starts one at each
matching line. Units are byte ranges ``[unit_start, unit_end)``; documents are ranges of
units. Global document ids follow the corpus order: files as given, documents in file order.

Cache: the scan of each file is stored in ``cache_dir`` under a key of (real path, size,
mtime, the split settings, the format version), written atomically and built under a file
lock, so ranks and runs that start together build it once and every later run reuses it.
A changed file gets a new key and is scanned again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from concurrent.futures import ProcessPoolExecutor
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import DataError
from .corpus import RECORD_BATCH, compile_document_start, file_kind, resolve_document_split

logger = logging.getLogger("bert_recipes")

INDEX_VERSION = 1
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".lz4", ".zip")


def default_cache_dir() -> Path:
    """``$BERT_RECIPES_CACHE/index``, else ``~/.cache/bert_recipes/index``."""
    root = os.environ.get("BERT_RECIPES_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "bert_recipes")
    return Path(root) / "index"


def random_access_problem(path: str) -> Optional[str]:
    """Why ``path`` cannot be read by position (compressed, a JSON array), or None."""
    if path.lower().endswith(_COMPRESSED):
        return "is compressed"
    if file_kind(path) == "json":
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
        if head.startswith(b"["):
            return "is a JSON array, not JSON Lines"
    return None


@dataclass(frozen=True)
class ScanSettings:
    """What the scan of one file depends on (besides the file itself)."""

    document_split: str  # effective: file | blank_line | record
    sentence_split: str  # punkt | line
    document_start_regex: Optional[str]
    text_column: str

    @classmethod
    def for_file(cls, path: str, cfg) -> "ScanSettings":
        kind = file_kind(path)
        return cls(resolve_document_split(cfg.document_split, kind), cfg.sentence_split, cfg.document_start_regex,
                   cfg.text_column if kind != "text" else "")


# --------------------------------------------------------------------------- scanning


def scan_text(path: str, settings: ScanSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scan a text file; return ``(unit_start, unit_end, doc_first_unit)`` (int64 arrays).

    ``doc_first_unit[d]`` is the first unit of document ``d`` (a final entry = number of
    units closes the last document). Byte offsets include the line ends of a unit's lines.
    """
    start_re = compile_document_start(settings.document_start_regex)
    per_line = settings.sentence_split == "line"
    split_on_blank = settings.document_split == "blank_line"
    starts: list[int] = []
    ends: list[int] = []
    firsts: list[int] = []
    pos, in_unit, new_doc = 0, False, True
    with open(path, "rb") as f:
        for line in f:
            n = len(line)
            if not line.strip():
                in_unit = False
                new_doc = new_doc or split_on_blank
            else:
                heading = start_re is not None and start_re.search(line.decode("utf-8", "replace").rstrip("\r\n"))
                if heading or new_doc:
                    firsts.append(len(starts))
                    new_doc = False
                if in_unit and not heading:
                    ends[-1] = pos + n
                else:
                    starts.append(pos)
                    ends.append(pos + n)
                in_unit = not (per_line or heading)
            pos += n
    firsts.append(len(starts))
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.asarray(firsts, np.int64)


def scan_jsonl(path: str, settings: ScanSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One unit and one document per non-blank line of a JSON Lines file.

    A record without ``text_column`` counts as one whose text is null (an empty document,
    as `datasets` reads it); the column must be in one of the first :data:`CHECKED_RECORDS`.

    Raises:
        DataError: one of the first records is not a JSON object, or none of them has
            ``text_column``.
    """
    starts, ends, pos, first = [], [], 0, []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                if len(first) < CHECKED_RECORDS:
                    first.append((number, line))
                starts.append(pos)
                ends.append(pos + len(line))
            pos += len(line)
    if first:
        _check_first_records(path, first, settings.text_column)
    units = len(starts)
    return np.asarray(starts, np.int64), np.asarray(ends, np.int64), np.arange(units + 1, dtype=np.int64)


CHECKED_RECORDS = RECORD_BATCH  # as many as one batch of the `datasets` reader (the tokenizer's trainer)


def _check_first_records(path: str, lines: list[tuple[int, bytes]], column: str) -> None:
    """The first records (``(line number, line)``) are readable (:func:`json_record`), and one
    of them has ``column``."""
    names: dict = {}
    for number, line in lines:
        try:
            names.update(dict.fromkeys(json_record(line, column) or {}))
        except ValueError:
            raise bad_record(path, number, column) from None
    if column not in names:
        where = f"the first {len(lines)} records of {path}" if len(lines) == CHECKED_RECORDS else path
        held = ", ".join(names) if names else "none: they are null"
        raise DataError(f"data.text_column: column '{column}' not found in {where} (columns: {held})")


def json_record(line: bytes, column: str) -> dict | None:
    """One JSON Lines record: an object whose ``column`` is a string, null or missing (null
    text, as `datasets` reads it), or None for a ``null`` record.

    Raises:
        ValueError: not JSON, not an object, or ``column`` holds a list or a number (its repr
            was trained on: found by a helper).
    """
    record = json.loads(line)
    if record is not None and not (isinstance(record, dict) and isinstance(record.get(column), (str, type(None)))):
        raise ValueError(f"not a JSON object with text in column '{column}'")
    return record


def bad_record(path: str, line: int, column: str) -> DataError:
    """The error for a record :func:`json_record` refuses, naming its line."""
    return DataError(f"data.text_column: line {line} of {path} is not a JSON object with text (a string) in "
                     f"column '{column}'")


def scan_parquet(path: str, settings: ScanSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One unit and one document per row (``unit_start`` = row number) of a parquet file.

    Raises:
        DataError: the file is not parquet or lacks ``text_column``.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        meta = pq.ParquetFile(path)
    except Exception as exc:
        raise DataError(f"data.train_files: cannot read {path} as parquet: {exc.__class__.__name__}: {exc}") from None
    names = meta.schema_arrow.names
    if settings.text_column not in names:
        raise DataError(f"data.text_column: column '{settings.text_column}' not found in {path} (columns: {', '.join(names)})")
    kind = meta.schema_arrow.field(settings.text_column).type
    values = kind.value_type if pa.types.is_dictionary(kind) else kind  # a pandas category column
    if not (pa.types.is_string(values) or pa.types.is_large_string(values)
            or getattr(pa.types, "is_string_view", lambda _: False)(values)):  # numbers were trained on as "0", "1", ...
        raise DataError(f"data.text_column: column '{settings.text_column}' of {path} holds {kind} values, expected "
                        "text (strings); point data.text_column at the text column")
    rows = np.arange(meta.metadata.num_rows, dtype=np.int64)
    return rows, rows + 1, np.arange(len(rows) + 1, dtype=np.int64)


def scan_file(path: str, settings: ScanSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scan of one file by its kind (see :func:`scan_text`); an empty file has no units."""
    if os.path.getsize(path) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(1, np.int64)
    kind = file_kind(path)
    if kind == "json":
        return scan_jsonl(path, settings)
    if kind == "parquet":
        return scan_parquet(path, settings)
    return scan_text(path, settings)


# --------------------------------------------------------------------------- cache


def cache_key(path: str, settings: ScanSettings) -> str:
    """A key that changes with the file's real path, size, mtime and the scan settings."""
    stat = os.stat(path)
    parts = [INDEX_VERSION, os.path.realpath(path), stat.st_size, stat.st_mtime_ns, settings.document_split,
             settings.sentence_split, settings.document_start_regex, settings.text_column]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


def _cached_scan(path: str, settings: ScanSettings, cache_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load the scan of ``path`` from the cache, or scan it and store it (atomically)."""
    target = cache_dir / f"{cache_key(path, settings)}.npz"
    try:
        with np.load(target) as saved:
            return saved["unit_start"], saved["unit_end"], saved["doc_first_unit"]
    except (OSError, ValueError, KeyError):
        pass  # absent or unreadable: (re)build
    starts, ends, firsts = scan_file(path, settings)
    tmp = target.with_name(f".{target.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, unit_start=starts, unit_end=ends, doc_first_unit=firsts)
    os.replace(tmp, target)
    return starts, ends, firsts


def _scan_job(args) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return _cached_scan(*args)


# --------------------------------------------------------------------------- the index


@dataclass
class DocumentIndex:
    """Where every document of a corpus is (see the module docstring).

    Attributes:
        files: the corpus files, in corpus order.
        doc_file: int32 ``[N]``: the file of each document.
        doc_units: int64 ``[N + 1]``: document ``d`` is units ``doc_units[d]:doc_units[d+1]``.
        unit_start, unit_end: int64 ``[U]``: byte range (text, JSON Lines) or row number
            (parquet) of each unit.
        sentence_split: ``punkt`` or ``line``.
    """

    files: list[str]
    doc_file: np.ndarray
    doc_units: np.ndarray
    unit_start: np.ndarray
    unit_end: np.ndarray
    sentence_split: str
    fingerprint: str = ""  # the corpus's layout: see layout_fingerprint (not the files' paths or times)
    path_fingerprint: str = ""  # changes with any file's path, size, mtime or the split settings (the cache's key)

    @property
    def fingerprints(self) -> tuple[str, str]:
        """The fingerprints a saved data state of this corpus may name: its layout's, and the
        path-and-time one earlier versions saved."""
        return self.fingerprint, self.path_fingerprint

    @property
    def num_documents(self) -> int:
        return len(self.doc_file)

    def units_of(self, doc: int) -> tuple[int, int]:
        """The global unit range ``[first, last)`` of a document."""
        return int(self.doc_units[doc]), int(self.doc_units[doc + 1])

    def document_bytes(self) -> np.ndarray:
        """int64 ``[N]``: bytes of each document (rows for parquet)."""
        first, last = self.doc_units[:-1], self.doc_units[1:] - 1
        return self.unit_end[last] - self.unit_start[first]

    def single_unit_documents(self) -> int:
        """Documents made of one unit (with ``sentence_split: line``: one sentence)."""
        return int(np.count_nonzero(np.diff(self.doc_units) == 1))


def build_index(files: list[str], cfg, *, cache_dir: Optional[str | os.PathLike] = None,
                num_proc: Optional[int] = None, show_progress: Optional[bool] = None) -> DocumentIndex:
    """Scan (or load from the cache) every file and assemble the corpus's :class:`DocumentIndex`.

    Args:
        files: local, uncompressed text / JSON Lines / parquet files (see
            :func:`random_access_problem`).
        cfg: the :class:`~bert_recipes.recipe.DataConfig` (split settings, ``text_column``).
        cache_dir: default ``cfg.index_cache_dir`` or :func:`default_cache_dir`.
        num_proc: parallel scanning processes (default ``cfg.preprocessing_num_workers``,
            else up to 4); scanning is parallel over files.
        show_progress: a progress bar over files (default: when stderr is a terminal).

    Raises:
        DataError: a file cannot be parsed, or lacks ``text_column``.
    """
    from filelock import FileLock

    cache = Path(cache_dir or cfg.index_cache_dir or default_cache_dir())
    try:
        cache.mkdir(parents=True, exist_ok=True)
        probe = cache / f".write-test-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        raise DataError(f"data.index_cache_dir: cannot write the document index to {cache} ({exc.strerror or exc}); "
                        "set data.index_cache_dir (or BERT_RECIPES_CACHE) to a writable folder") from None
    jobs = [(path, ScanSettings.for_file(path, cfg), cache) for path in files]
    corpus_key = hashlib.sha256("\n".join(cache_key(p, s) for p, s, _ in jobs).encode()).hexdigest()[:16]
    workers = num_proc or cfg.preprocessing_num_workers or min(4, os.cpu_count() or 1)
    workers = max(1, min(workers, len(files)))
    bar = _progress(len(files), show_progress)
    with FileLock(str(cache / f"{corpus_key}.lock")):  # ranks starting together build once
        if workers == 1:
            scans = [_scan_and_tick(job, bar) for job in jobs]
        else:
            with ProcessPoolExecutor(workers) as pool:
                scans = [_tick(scan, bar) for scan in pool.map(_scan_job, jobs, chunksize=4)]
    if bar is not None:
        bar.close()
    index = _assemble(files, scans, cfg.sentence_split)
    index.fingerprint = layout_fingerprint(index, [settings for _, settings, _ in jobs])
    index.path_fingerprint = corpus_key
    return index


def layout_fingerprint(index: DocumentIndex, settings: list) -> str:
    """What a saved data position depends on: each file's size and split settings, its
    documents, their units and each document's end byte. The same corpus copied or moved
    elsewhere (a cluster job staging its data to local disk) has the same layout; its paths
    and times are not part of it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(json.dumps([INDEX_VERSION, [os.path.getsize(path) for path in index.files],
                              [dataclasses.astuple(setting) for setting in settings]]).encode())
    last_units = index.doc_units[1:] - 1
    for array in (index.doc_file, index.doc_units, index.unit_end[last_units] if len(last_units) else last_units):
        digest.update(np.ascontiguousarray(array, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _progress(total: int, show: Optional[bool]):
    if show is None:
        show = sys.stderr.isatty() and total > 1
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="index", unit="file", leave=False)


def _tick(scan, bar):
    if bar is not None:
        bar.update(1)
    return scan


def _scan_and_tick(job, bar):
    return _tick(_scan_job(job), bar)


def _assemble(files: list[str], scans: list, sentence_split: str) -> DocumentIndex:
    doc_file, doc_units, starts, ends, offset = [], [np.zeros(1, np.int64)], [], [], 0
    for number, (unit_start, unit_end, firsts) in enumerate(scans):
        docs = len(firsts) - 1
        doc_file.append(np.full(docs, number, np.int32))
        doc_units.append(firsts[1:] + offset)
        starts.append(unit_start)
        ends.append(unit_end)
        offset += len(unit_start)
    return DocumentIndex(
        files=list(files),
        doc_file=np.concatenate(doc_file) if doc_file else np.zeros(0, np.int32),
        doc_units=np.concatenate(doc_units),
        unit_start=np.concatenate(starts) if starts else np.zeros(0, np.int64),
        unit_end=np.concatenate(ends) if ends else np.zeros(0, np.int64),
        sentence_split=sentence_split,
    )


__all__ = ["DocumentIndex", "ScanSettings", "build_index", "cache_key", "default_cache_dir", "random_access_problem",
           "scan_file"]

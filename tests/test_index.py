"""The document index (bert_recipes.data.index) and random access (bert_recipes.data.reader)."""

from __future__ import annotations

import json
import multiprocessing
import os
import random

import numpy as np
import pytest

from bert_recipes.data import index as index_module
from bert_recipes.data.index import build_index, random_access_problem
from bert_recipes.data.reader import IndexedCorpus
from bert_recipes.errors import DataError
from bert_recipes.recipe import DataConfig

from tests.data_fixtures import make_doc, vocab_tokenizer, write_blank_line_corpus  # noqa: F401


def cfg(files, **kw):
    return DataConfig(train_files=files, **kw)


def texts(index, tokenizer=None):
    """Every document's sentences, in corpus order."""
    corpus = IndexedCorpus(index, tokenizer)
    return [corpus.sentences(d) for d in range(index.num_documents)]


GOOGLE = "One. Two and two.\nThree is here.\n\nFour.\n  \nFive?\r\nSix.\n"


def test_blank_line_documents_punkt_and_line_sentences(tmp_path):
    path = tmp_path / "g.txt"
    path.write_bytes(GOOGLE.encode())
    punkt = build_index([str(path)], cfg([str(path)]), cache_dir=tmp_path / "c")
    assert texts(punkt) == [["One.", "Two and two.", "Three is here."], ["Four."], ["Five?", "Six."]]
    assert punkt.num_documents == 3 and list(np.diff(punkt.doc_units)) == [1, 1, 1]  # a paragraph per unit
    line = build_index([str(path)], cfg([str(path)], sentence_split="line"), cache_dir=tmp_path / "c")
    # Google's input format: one sentence per line, never re-split ("One. Two and two." stays whole)
    assert texts(line) == [["One. Two and two.", "Three is here."], ["Four."], ["Five?", "Six."]]
    assert list(np.diff(line.doc_units)) == [2, 1, 2] and line.single_unit_documents() == 1


def test_file_mode_regex_headings_and_byte_ranges(tmp_path):
    a, b, empty = tmp_path / "a.txt", tmp_path / "b.txt", tmp_path / "e.txt"
    a.write_text(" = Alpha = \nText one.\n\nMore text.\n = Beta = \nBeta text.\n", encoding="utf-8")
    b.write_bytes(b"Caf\xc3\xa9 ok.\n\xff\xfe bad bytes.\n")
    empty.write_text("", encoding="utf-8")
    files = [str(a), str(empty), str(b)]
    whole = build_index(files, cfg(files, document_split="file"), cache_dir=tmp_path / "c")
    assert whole.num_documents == 2 and list(whole.doc_file) == [0, 2]
    assert texts(whole)[1] == ["Café ok.", "\ufffd\ufffd bad bytes."]  # invalid UTF-8 replaced, not fatal
    heads = build_index(files, cfg(files, document_split="file", document_start_regex=r"^ = [^=].* = $"),
                        cache_dir=tmp_path / "c")
    assert texts(heads) == [["= Alpha =", "Text one.", "More text."], ["= Beta =", "Beta text."],
                            ["Café ok.", "\ufffd\ufffd bad bytes."]]
    data = a.read_bytes()
    first, last = heads.units_of(1)
    assert data[heads.unit_start[first] : heads.unit_end[last - 1]] == b" = Beta = \nBeta text.\n"


def test_json_lines_and_parquet_records(tmp_path):
    jsonl = tmp_path / "r.jsonl"
    jsonl.write_text(json.dumps({"text": "Rec one. Has two."}) + "\n\n" + json.dumps({"text": "Rec two."}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "r.parquet"
    pq.write_table(pa.table({"text": [f"Row {i}. Second." for i in range(7)]}), parquet, row_group_size=3)
    files = [str(jsonl), str(parquet)]
    index = build_index(files, cfg(files), cache_dir=tmp_path / "c")
    docs = texts(index)
    assert docs[:2] == [["Rec one.", "Has two."], ["Rec two."]]
    assert docs[2:] == [[f"Row {i}.", "Second."] for i in range(7)]
    with pytest.raises(DataError, match=r"^data.text_column: column 'body' not found in .*r.jsonl \(columns: text\)"):
        build_index([str(jsonl)], cfg([str(jsonl)], text_column="body"), cache_dir=tmp_path / "c")
    with pytest.raises(DataError, match=r"^data.text_column: column 'body' not found in .*r.parquet"):
        build_index([str(parquet)], cfg([str(parquet)], text_column="body"), cache_dir=tmp_path / "c")


def test_json_lines_records_without_the_column_are_null_text_as_datasets_reads_them(tmp_path):
    """Records without the text column (the first one too) are empty documents, as `datasets`
    reads them for the tokenizer's trainer and compressed files; they were refused by the
    index when first and failed the run mid-way when later (the trainer skipped them)."""
    from bert_recipes.data.corpus import iter_records
    from bert_recipes.tokenizer import _iter_lines

    jsonl = tmp_path / "r.jsonl"
    rows = [{"id": 0}, {"text": "Rec one. Has two."}, {"id": 2, "title": "t"}, {"text": "Rec two."}, None, {"id": 4}]
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    index = build_index([str(jsonl)], cfg([str(jsonl)]), cache_dir=tmp_path / "c")
    assert [doc for doc in texts(index) if doc] == [["Rec one.", "Has two."], ["Rec two."]]
    assert list(iter_records(str(jsonl), "text")) == list(_iter_lines([str(jsonl)])) == ["Rec one. Has two.", "Rec two."]
    # the column must be somewhere in the first 64 records (a typo'd data.text_column)
    late = tmp_path / "late.jsonl"
    late.write_text("".join(json.dumps({"id": i}) + "\n" for i in range(64)) + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"^data.text_column: column 'text' not found in the first 64 records of "
                                        r".*late.jsonl \(columns: id\)$"):
        build_index([str(late)], cfg([str(late)]), cache_dir=tmp_path / "c")
    listing = tmp_path / "list.jsonl"
    listing.write_text(json.dumps({"text": "x"}) + '\n["a", "b"]\n')  # any of the first records, not only the first
    with pytest.raises(DataError, match=r"^data.text_column: line 2 of .*list.jsonl is not a JSON object with text"):
        build_index([str(listing)], cfg([str(listing)]), cache_dir=tmp_path / "c")
    number = tmp_path / "number.jsonl"  # refused by the scan, not once the run has started
    number.write_text(json.dumps({"text": "x"}) + "\n" + json.dumps({"text": 5}) + "\n")
    with pytest.raises(DataError, match=r"^data.text_column: line 2 of .*number.jsonl is not a JSON object with text"):
        build_index([str(number)], cfg([str(number)]), cache_dir=tmp_path / "c")
    nulls = tmp_path / "nulls.jsonl"
    nulls.write_text("null\n" * 64 + json.dumps({"text": "x"}) + "\n")
    with pytest.raises(DataError, match=r"not found in the first 64 records of .*nulls.jsonl \(columns: none: they are null\)$"):
        build_index([str(nulls)], cfg([str(nulls)]), cache_dir=tmp_path / "c")


def test_sources_without_random_access_are_named(tmp_path):
    array = tmp_path / "a.json"
    array.write_text('[{"text": "x"}]')
    assert random_access_problem(str(array)) == "is a JSON array, not JSON Lines"
    assert random_access_problem(str(tmp_path / "x.txt.gz")) == "is compressed"
    plain = tmp_path / "p.txt"
    plain.write_text("x")
    assert random_access_problem(str(plain)) is None


# ----------------------------------------------------------------------------- cache


def counting_scans(monkeypatch):
    calls = []
    real = index_module.scan_file

    def scan(path, settings):
        calls.append(path)
        return real(path, settings)

    monkeypatch.setattr(index_module, "scan_file", scan)
    return calls


def test_cache_is_reused_and_invalidated_by_a_change(tmp_path, monkeypatch):
    files = []
    for k in range(3):
        path = tmp_path / f"{k}.txt"
        path.write_text(f"Doc {k} one.\nTwo.\n\nDoc {k} b.\n", encoding="utf-8")
        files.append(str(path))
    calls = counting_scans(monkeypatch)
    c = cfg(files)
    first = build_index(files, c, cache_dir=tmp_path / "cache", num_proc=1)
    assert sorted(calls) == sorted(files)
    again = build_index(files, c, cache_dir=tmp_path / "cache", num_proc=1)
    assert len(calls) == 3 and np.array_equal(first.unit_start, again.unit_start)  # nothing re-scanned
    build_index(files, cfg(files, sentence_split="line"), cache_dir=tmp_path / "cache", num_proc=1)
    assert len(calls) == 6  # other split settings: another key
    os.utime(files[1], ns=(1, 1))  # mtime changed
    with open(files[2], "a", encoding="utf-8") as f:
        f.write("\nDoc 2 c is new.\n")
    changed = build_index(files, c, cache_dir=tmp_path / "cache", num_proc=1)
    assert sorted(calls[6:]) == sorted(files[1:])
    assert changed.num_documents == first.num_documents + 1
    assert texts(changed)[-1] == ["Doc 2 c is new."]


def test_unreadable_cache_entry_is_rebuilt(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("One.\n\nTwo.\n", encoding="utf-8")
    build_index([str(path)], cfg([str(path)]), cache_dir=tmp_path / "cache")
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(b"not a zip")
    assert build_index([str(path)], cfg([str(path)]), cache_dir=tmp_path / "cache").num_documents == 2


def _build_in_child(files, cache, log, queue):
    real = index_module.scan_file

    def scan(path, settings):
        with open(log, "a") as f:
            f.write(path + "\n")
        return real(path, settings)

    index_module.scan_file = scan
    index = build_index(files, DataConfig(train_files=files), cache_dir=cache, num_proc=1)
    queue.put((index.unit_start.tolist(), index.doc_units.tolist()))


def test_concurrent_builds_scan_each_file_once(tmp_path):
    rng = random.Random(0)
    files = [str(write_blank_line_corpus(tmp_path / f"{k}.txt", [make_doc(k, 30, 8, rng) for _ in range(20)]))
             for k in range(4)]
    log, cache = tmp_path / "scans.log", tmp_path / "cache"
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    ranks = [context.Process(target=_build_in_child, args=(files, cache, log, queue)) for _ in range(3)]
    for p in ranks:
        p.start()
    results = [queue.get(timeout=60) for _ in ranks]
    for p in ranks:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert results[0] == results[1] == results[2]
    assert sorted(log.read_text().split()) == sorted(files)  # three ranks, one scan per file
    assert len(list(cache.glob("*.npz"))) == 4 and not list(cache.glob(".*tmp*"))


def test_parallel_scan_equals_serial_scan(tmp_path):
    rng = random.Random(1)
    files = [str(write_blank_line_corpus(tmp_path / f"{k}.txt", [make_doc(k, 5, 4, rng) for _ in range(6)]))
             for k in range(5)]
    serial = build_index(files, cfg(files), cache_dir=tmp_path / "a", num_proc=1)
    parallel = build_index(files, cfg(files), cache_dir=tmp_path / "b", num_proc=2)
    for name in ("doc_file", "doc_units", "unit_start", "unit_end"):
        assert np.array_equal(getattr(serial, name), getattr(parallel, name))


# ----------------------------------------------------------------------------- random access


def test_random_b_is_uniform_over_other_documents_and_reads_only_what_it_needs(tmp_path, vocab_tokenizer):  # noqa: F811
    rng = random.Random(2)
    docs = [make_doc(k, 20, 6, rng) for k in range(10)]
    path = str(write_blank_line_corpus(tmp_path / "c.txt", docs))
    index = build_index([path], cfg([path], sentence_split="line"), cache_dir=tmp_path / "cache")
    corpus = IndexedCorpus(index, vocab_tokenizer)
    draws = np.random.default_rng(0)
    counts = np.zeros(10)
    starts = np.zeros(20)
    for _ in range(4000):
        tokens, doc = corpus.random_b(3, 10, draws)
        counts[doc] += 1
        sentences = corpus.document(doc)
        first = next(i for i, s in enumerate(sentences) if tokens[: len(s)] == s)  # B starts at a sentence
        starts[first] += 1
        assert len(tokens) >= 10 or first >= 18
    assert counts[3] == 0  # never A's own document
    expected = 4000 / 9
    assert np.all(np.abs(counts[np.arange(10) != 3] - expected) < 5 * np.sqrt(expected))
    assert np.all(np.abs(starts - 200) < 5 * np.sqrt(200))  # the start sentence is uniform (Google: randint)
    # a B segment reads a few lines, not its document: ~7 words * 7 bytes per sentence, two sentences
    assert corpus.bytes_read["random_next"] / 4000 < 2.5 * 60


def test_token_ids_ignore_padding_and_truncation_saved_in_a_tokenizer(tmp_path, vocab_tokenizer):  # noqa: F811
    """A tokenizer.json may turn on padding and truncation (the MiniLM one does): sentences
    must still be tokenized whole and unpadded, as the transformers call does."""
    import copy

    tokenizer = copy.deepcopy(vocab_tokenizer)
    tokenizer.backend_tokenizer.enable_padding(length=32)
    tokenizer.backend_tokenizer.enable_truncation(4)
    rng = random.Random(3)
    docs = [make_doc(k, 5, 9, rng) for k in range(3)]
    path = str(write_blank_line_corpus(tmp_path / "c.txt", docs))
    corpus = IndexedCorpus(build_index([path], cfg([path], sentence_split="line"), cache_dir=tmp_path / "c"), tokenizer)
    for k, doc in enumerate(docs):
        expected = vocab_tokenizer(doc, add_special_tokens=False)["input_ids"]
        assert corpus.document(k) == expected and all(len(ids) == 10 for ids in expected)
        tokens, _ = corpus.random_b(k, 25, np.random.default_rng(k))
        assert len(tokens) in (10, 20, 30) and 0 not in tokens  # whole 10-token sentences, no [PAD]


def test_random_b_finds_the_documents_with_text_among_null_records(tmp_path, vocab_tokenizer):  # noqa: F811
    """JSON Lines with null records: 10 draws gave up on B now and then (a chunk skipped with
    'no other document'; found by a helper on records a third null); the draws go on (here 8
    of 32 records have text: 10 draws failed 7.7% of the time, 100 fail once in 10**11)."""
    path = tmp_path / "c.jsonl"
    rng = random.Random(0)
    records = [{"text": " ".join(make_doc(k, 3, 6, rng))} for k in range(8)] + [{"text": None}] * 24
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    index = build_index([str(path)], cfg([str(path)]), cache_dir=tmp_path / "cache")
    corpus = IndexedCorpus(index, vocab_tokenizer)
    draws = np.random.default_rng(0)
    found = [corpus.random_b(0, 5, draws) for _ in range(200)]
    assert all(b is not None and 1 <= b[1] < 8 for b in found)  # another document with text, every time


def test_parquet_text_columns_of_every_string_type_are_read(tmp_path):
    """string_view and dictionary-encoded (a pandas category) text columns are text too (a
    helper found them refused by the new type check)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = ["One sentence here. Another one.", "A second record. With two sentences."]
    for name, column in [("plain", pa.array(records)), ("dict", pa.array(records).dictionary_encode()),
                         ("view", pa.array(records, type=pa.string_view()))]:
        path = str(tmp_path / f"{name}.parquet")
        pq.write_table(pa.table({"text": column}), path)
        index = build_index([path], cfg([path]), cache_dir=tmp_path / "cache")
        assert [" ".join(sentences) for sentences in texts(index)] == records, name
    path = str(tmp_path / "numbers.parquet")
    pq.write_table(pa.table({"text": pa.array([1, 2])}), path)
    with pytest.raises(DataError, match="holds int64 values, expected text"):
        build_index([path], cfg([path]), cache_dir=tmp_path / "cache")

"""Documents and sentences: bert_recipes.data.corpus."""

from __future__ import annotations

import json
import re
import time

import pytest

from bert_recipes.data.corpus import (
    file_kind,
    group_documents,
    iter_documents,
    iter_raw_documents,
    split_sentences,
)
from bert_recipes.errors import DataError
from bert_recipes.recipe import DataConfig

from tests.data_fixtures import corpus_dir  # noqa: F401


def test_split_sentences_punkt_and_hard_wraps():
    text = "Emma Woodhouse, handsome, clever,\nand rich. She was happy!  Was she?\n\nA new paragraph\nwithout a period"
    assert split_sentences(text) == [
        "Emma Woodhouse, handsome, clever, and rich.",
        "She was happy!",
        "Was she?",
        "A new paragraph without a period",
    ]


def test_split_sentences_never_crosses_a_blank_line_and_handles_empty():
    assert split_sentences("no period here\n\nnor here") == ["no period here", "nor here"]
    assert split_sentences("") == [] and split_sentences(" \n\t\n ") == []


@pytest.mark.parametrize("unit, size", [("alpha beta gamma ", 1_000_000), ("x", 1_000_000), ("alpha. ", 200_000)])
def test_split_sentences_on_a_long_line_is_fast_and_loses_nothing(unit, size):
    text = unit * (size // len(unit))
    start = time.perf_counter()
    sentences = split_sentences(text)
    assert time.perf_counter() - start < 20
    assert "".join("".join(s.split()) for s in sentences) == "".join(text.split())


@pytest.mark.parametrize(
    "name, kind",
    [("a.txt", "text"), ("a.jsonl", "json"), ("a.json.gz", "json"), ("b.parquet", "parquet"), ("wiki.raw", "text")],
)
def test_file_kind(name, kind):
    assert file_kind(name) == kind


def test_group_documents_modes():
    records = ["p1 line1\np1 line2\n\np2", "p3\n \np4"]  # a whitespace-only line is blank too
    assert list(group_documents(iter(records), "blank_line", None)) == [["p1 line1 p1 line2"], ["p2"], ["p3"], ["p4"]]
    assert list(group_documents(iter(records), "record", None)) == [["p1 line1 p1 line2", "p2"], ["p3", "p4"]]
    assert list(group_documents(iter(records), "file", None)) == [["p1 line1 p1 line2", "p2", "p3", "p4"]]
    assert list(group_documents(iter([]), "file", None)) == [[]]  # a file is always one document


def test_group_documents_start_regex_makes_headings_start_documents():
    start = re.compile(r"^ = [^=].* = $")
    record = " = Alpha = \n Alpha is a letter .\n = = History = = \n It is old .\n = Beta = \n Beta follows ."
    docs = list(group_documents(iter([record]), "file", start))
    assert docs == [
        ["= Alpha =", "Alpha is a letter . = = History = = It is old ."],
        ["= Beta =", "Beta follows ."],
    ]


def _cfg(**kw):
    return DataConfig(train_files=["x"], **kw)


def test_iter_documents_text_blank_line_default(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("One. Two.\n\n\n\nThree\ncontinues. Four.\n", encoding="utf-8")
    assert list(iter_documents([str(path)], _cfg())) == [["One.", "Two."], ["Three continues.", "Four."]]


def test_iter_documents_file_mode_crlf_and_empty_files(tmp_path):
    a, empty, b = tmp_path / "a.txt", tmp_path / "empty.txt", tmp_path / "b.txt"
    a.write_bytes(b"First one.\r\nStill first.\r\n\r\nSecond par.\r\n")
    empty.write_bytes(b"")
    b.write_text("Other file.", encoding="utf-8")
    docs = list(iter_documents([str(a), str(empty), str(b)], _cfg(document_split="file")))
    assert docs == [["First one.", "Still first.", "Second par."], ["Other file."]]
    raw = list(iter_raw_documents([str(a), str(empty), str(b)], _cfg(document_split="file")))
    assert [d.index for d in raw] == [0, 1, 2] and raw[1].paragraphs == []  # empty file = empty document


def test_iter_documents_reads_invalid_utf8(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Caf\xe9 au lait. Na\xefve text.\n".encode("latin-1") + b"\xff\xfe\x80 bytes. End.\n")
    (doc,) = iter_documents([str(path)], _cfg())
    assert doc[0] == "Caf\ufffd au lait." and doc[-1] == "End." and len(doc) == 4


def test_iter_documents_jsonl_records_and_missing_column(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [{"text": "Rec one. Has two."}, {"text": ""}, {"text": "Rec two.\n\nSecond par."}, {"text": None}]
    path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert list(iter_documents([str(path)], _cfg())) == [["Rec one.", "Has two."], ["Rec two.", "Second par."]]
    with pytest.raises(DataError, match=r"data.text_column: column 'body' not found in .*d.jsonl"):
        list(iter_documents([str(path)], _cfg(text_column="body")))


def test_iter_documents_parquet_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"content": ["A doc. Two.", "B doc."], "id": [1, 2]}), path)
    assert list(iter_documents([str(path)], _cfg(text_column="content"))) == [["A doc.", "Two."], ["B doc."]]


def test_iter_raw_documents_keep_and_resume(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("\n\n".join(f"Doc {i}." for i in range(7)), encoding="utf-8")
    cfg = _cfg()
    every = list(iter_raw_documents([str(path)], cfg, keep=lambda i: i % 3 == 1))
    assert [d.index for d in every] == list(range(7))
    assert [d.paragraphs for d in every if d.paragraphs is not None] == [["Doc 1."], ["Doc 4."]]
    resumed = list(iter_raw_documents([str(path)], cfg, start=5))
    assert [(d.index, d.paragraphs) for d in resumed] == [(5, ["Doc 5."]), (6, ["Doc 6."])]


def test_iter_raw_documents_file_order_and_stable_keys(tmp_path):
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"f{i}.txt"))
        (tmp_path / f"f{i}.txt").write_text(f"File {i} a.\n\nFile {i} b.", encoding="utf-8")
    docs = list(iter_raw_documents(files, _cfg(), order=[2, 0, 1]))
    assert [d.paragraphs[0] for d in docs] == ["File 2 a.", "File 2 b.", "File 0 a.", "File 0 b.", "File 1 a.", "File 1 b."]
    assert [d.key for d in docs] == [2 << 32, 2 << 32 | 1, 0, 1, 1 << 32, 1 << 32 | 1]
    assert [d.file_position for d in docs] == [0, 0, 1, 1, 2, 2]
    assert [d.file_first_index for d in docs] == [0, 0, 2, 2, 4, 4]
    tail = list(iter_raw_documents(files, _cfg(), order=[2, 0, 1], start=3, start_file=1, start_file_index=2))
    assert [d.paragraphs[0] for d in tail] == ["File 0 b.", "File 1 a.", "File 1 b."]


def test_invalid_document_start_regex_is_a_data_error(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("x", encoding="utf-8")
    with pytest.raises(DataError, match="data.document_start_regex"):
        list(iter_documents([str(path)], _cfg(document_start_regex="([")))


@pytest.mark.realdata
def test_wikitext_articles_split_by_heading_regex(corpus_dir):  # noqa: F811
    path = str(corpus_dir / "wikitext-2-raw" / "wiki.test.raw")
    cfg = _cfg(document_split="file", document_start_regex=r"^ = [^=].* = $")
    docs = list(iter_raw_documents([path], cfg))
    assert len(docs) == 62  # the 62 articles of the WikiText-2 test split
    assert docs[0].paragraphs[0] == "= Robert Boulter =" and docs[1].paragraphs[0] == "= Du Fu ="


def test_hub_dataset_code_path_streams_records(tmp_path, monkeypatch):
    """``data.dataset_name`` (offline here: the Hub load is redirected to a local json file)."""
    from datasets import load_dataset

    from bert_recipes.data import corpus

    path = tmp_path / "hub.jsonl"
    path.write_text("\n".join(json.dumps({"body": f"Article {i}. It has two sentences."}) for i in range(3)),
                    encoding="utf-8")
    calls = []

    def fake_hub(name, config_name=None, *, split, streaming=True, **kwargs):
        calls.append((name, config_name, split))
        return load_dataset("json", data_files=[str(path)], split="train", streaming=True)

    monkeypatch.setattr(corpus, "_load_streaming", fake_hub)
    cfg = DataConfig(dataset_name="someone/corpus", dataset_config_name="en", text_column="body")
    docs = list(iter_documents([], cfg))
    assert docs == [[f"Article {i}.", "It has two sentences."] for i in range(3)]
    assert calls == [("someone/corpus", "en", "train")]
    list(iter_documents([], cfg, hub_split="validation"))
    assert calls[-1] == ("someone/corpus", "en", "validation")


def test_hub_dataset_unavailable_is_a_data_error(monkeypatch):
    from bert_recipes.data import corpus

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub\nsecond line")

    monkeypatch.setattr(corpus, "_load_streaming", offline)
    with pytest.raises(DataError, match=r"^data.dataset_name: cannot load 'x/y' split 'train': Couldn't reach the Hub$"):
        list(iter_documents([], DataConfig(dataset_name="x/y")))

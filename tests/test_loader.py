"""The pretraining stream and DataLoader: bert_recipes.data.loader."""

from __future__ import annotations

import io
import logging
import random
from collections import Counter

import pytest
import torch

from bert_recipes.data import PretrainingStream, build_pretraining_dataloader
from bert_recipes.errors import DataError
from bert_recipes.recipe import DataConfig

from tests.data_fixtures import (  # noqa: F401
    corpus_dir,
    gutenberg_tokenizer,
    make_doc,
    original_ids,
    segments,
    tag,
    token_doc_table,
    vocab_tokenizer,
    write_blank_line_corpus,
)


def cfg(files, **kw):
    values = dict(max_seq_length=64, max_predictions_per_seq=10, shuffle_buffer_size=16, random_next_buffer_size=20,
                  packing=False)  # padded rows: the layout these tests check (packing: tests/test_packing.py)
    values.update(kw)
    return DataConfig(train_files=files, **values)


def corpus(tmp_path, n_files=2, docs_per_file=6, sentences=(4, 14), words=(4, 9), seed=0):
    """Blank-line separated synthetic documents with distinct vocabularies, over ``n_files``."""
    rng = random.Random(seed)
    files, docs = [], []
    for f in range(n_files):
        file_docs = [make_doc(f * docs_per_file + k, rng.randint(*sentences), rng.randint(*words), rng)
                     for k in range(docs_per_file)]
        files.append(str(write_blank_line_corpus(tmp_path / f"part{f}.txt", file_docs)))
        docs.extend(file_docs)
    return files, docs


def take(stream, n=None):
    out = []
    for item in stream:
        out.append(item)
        if n is not None and len(out) >= n:
            break
    return out


def doc_of(ids, table):
    return {table[t] for t in ids if t in table}


def sublist_positions(part, whole):
    return [i for i in range(len(whole) - len(part) + 1) if whole[i : i + len(part)] == part]


def check_instance(item, tokenizer, max_seq_length):
    ids, types, labels = item["input_ids"], item["token_type_ids"], item["labels"]
    assert len(ids) == len(types) == len(labels) <= max_seq_length
    assert ids[0] == tokenizer.cls_token_id and ids[-1] == tokenizer.sep_token_id
    first_b = types.index(1)
    assert types == [0] * first_b + [1] * (len(ids) - first_b)  # 0 for [CLS] A [SEP], 1 for B [SEP]
    assert ids[first_b - 1] == tokenizer.sep_token_id and ids.count(tokenizer.sep_token_id) >= 2
    for pos in (0, first_b - 1, len(ids) - 1):
        assert labels[pos] == -100
    assert item["next_sentence_label"] in (0, 1)


def test_stream_instances_are_valid_and_deterministic(tmp_path, vocab_tokenizer):  # noqa: F811
    files, _ = corpus(tmp_path)
    c = cfg(files)
    first = take(PretrainingStream(c, vocab_tokenizer, files, seed=1), 150)
    assert first == take(PretrainingStream(c, vocab_tokenizer, files, seed=1), 150)
    assert first != take(PretrainingStream(c, vocab_tokenizer, files, seed=2), 150)
    for item in first:
        check_instance(item, vocab_tokenizer, 64)
        assert set(item) == {"input_ids", "token_type_ids", "labels", "next_sentence_label"}


def test_nsp_balance_random_b_from_other_documents_isnext_b_follows_a(tmp_path, vocab_tokenizer):  # noqa: F811
    files, docs = corpus(tmp_path, n_files=2, docs_per_file=10, sentences=(10, 20))
    table = token_doc_table(vocab_tokenizer)
    streams = [vocab_tokenizer(" ".join(d), add_special_tokens=False)["input_ids"] for d in docs]
    items = take(PretrainingStream(cfg(files), vocab_tokenizer, files, seed=3), 1000)  # about 15 passes
    labels = [x["next_sentence_label"] for x in items]
    assert 0.44 < sum(labels) / len(labels) < 0.58
    for item in items:
        a, b = segments({**item, "input_ids": original_ids(item)})
        (doc_a,) = doc_of(a, table)
        if item["next_sentence_label"] == 1:
            assert doc_of(b, table) and doc_a not in doc_of(b, table)
            continue
        assert doc_of(b, table) == {doc_a}
        whole = streams[doc_a]
        ends_of_a = [p + len(a) for p in sublist_positions(a, whole)]
        starts_of_b = sublist_positions(b, whole)
        assert any(0 <= sb - ea <= 64 for ea in ends_of_a for sb in starts_of_b), "B does not follow A"


def test_one_document_corpus_refuses_nsp_and_builds_isnext_only_without_it(tmp_path, vocab_tokenizer, caplog):  # noqa: F811
    path = str(write_blank_line_corpus(tmp_path / "one.txt", [make_doc(0, 40, 6, random.Random(0))]))
    with pytest.raises(DataError, match=r"^data.train_files: the corpus is one document, .* data.random_next_prob=0"):
        PretrainingStream(cfg([path]), vocab_tokenizer, [path], seed=0)
    table = token_doc_table(vocab_tokenizer)
    with caplog.at_level(logging.WARNING, logger="bert_recipes"):
        items = take(PretrainingStream(cfg([path], random_next_prob=0.0), vocab_tokenizer, [path], seed=0), 200)
    assert len(items) == 200 and {x["next_sentence_label"] for x in items} == {0}  # never a "random" B from itself
    for item in items:
        a, b = segments({**item, "input_ids": original_ids(item)})
        assert doc_of(a, table) == doc_of(b, table) == {0}
    # a one-sentence chunk (the document's last sentence) would need another document: skipped, said once
    assert len([r for r in caplog.records if "no other document" in r.getMessage()]) == 1


def test_single_sentence_documents_are_used_and_counted(tmp_path, vocab_tokenizer, caplog):  # noqa: F811
    rng = random.Random(1)
    docs = [make_doc(k, 1 if k < 3 else 8, 6, rng) for k in range(10)]
    path = str(write_blank_line_corpus(tmp_path / "c.txt", docs))
    with caplog.at_level(logging.WARNING, logger="bert_recipes"):
        items = take(PretrainingStream(cfg([path]), vocab_tokenizer, [path], seed=0, infinite=False))
    table = token_doc_table(vocab_tokenizer)
    firsts = [x for x in items if doc_of(segments({**x, "input_ids": original_ids(x)})[0], table) <= {0, 1, 2}]
    assert len(firsts) == 3 and all(x["next_sentence_label"] == 1 for x in firsts)
    assert any("3 of 10 documents" in r.getMessage() for r in caplog.records)


def test_a_700_token_sentence_and_a_1mb_line_never_exceed_max_seq_length(tmp_path, vocab_tokenizer):  # noqa: F811
    rng = random.Random(2)
    long_doc = [" ".join(rng.choice(["dakoko", "darara"]) for _ in range(699)) + "."]
    path = str(write_blank_line_corpus(tmp_path / "long.txt", [long_doc] + [make_doc(k, 6, 6, rng) for k in (1, 2)]))
    line = tmp_path / "line.txt"
    line.write_text(" ".join(rng.choice(["ebkoko"] * 9 + ["ebrara", "Ebmimi."]) for _ in range(150_000)), encoding="utf-8")
    assert line.stat().st_size > 1_000_000
    for files in ([path], [str(line), path]):
        c = cfg(files, max_seq_length=128, max_predictions_per_seq=20)
        items = take(PretrainingStream(c, vocab_tokenizer, files, seed=0), 300)
        for item in items:
            check_instance(item, vocab_tokenizer, 128)
            a, b = segments(item)
            assert a and b


def test_loader_batches_are_padded_to_a_multiple_of_8(tmp_path, vocab_tokenizer):  # noqa: F811
    files, _ = corpus(tmp_path)
    loader = build_pretraining_dataloader(cfg(files, short_seq_prob=0.5), vocab_tokenizer, files, batch_size=5,
                                          seed=0, infinite=False)
    widths = set()
    for batch in loader:
        width = batch["input_ids"].shape[1]
        widths.add(width)
        assert width % 8 == 0 and width <= 64
        assert all(t.dtype == torch.long for t in batch.values())
        assert batch["next_sentence_label"].shape == (batch["input_ids"].shape[0],)
        lengths = batch["attention_mask"].sum(1)
        assert (batch["input_ids"][batch["attention_mask"] == 0] == vocab_tokenizer.pad_token_id).all()
        assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()
        assert lengths.max() > width - 8
    assert len(widths) > 1


def test_infinite_cycles_finite_stops_and_max_samples(tmp_path, vocab_tokenizer):  # noqa: F811
    files, _ = corpus(tmp_path, n_files=1, docs_per_file=3, sentences=(4, 6))
    c = cfg(files)
    one_pass = len(take(PretrainingStream(c, vocab_tokenizer, files, seed=0, infinite=False)))
    assert 0 < one_pass < 40
    assert len(take(PretrainingStream(c, vocab_tokenizer, files, seed=0), 5 * one_pass)) == 5 * one_pass
    assert len(take(PretrainingStream(c, vocab_tokenizer, files, seed=0, max_samples=7))) == 7
    assert len(take(PretrainingStream(c, vocab_tokenizer, files, seed=0, infinite=False, max_samples=10**6))) == one_pass
    loader = build_pretraining_dataloader(c, vocab_tokenizer, files, batch_size=4, seed=0, max_samples=9, num_workers=2)
    assert sum(len(b["input_ids"]) for b in loader) == 9  # split over the workers


# ----------------------------------------------------------------------------- sharding


def exact_corpus(tmp_path, n_files=2, docs_per_file=5):
    """Sentences of exactly 8 tokens, documents of 4k sentences, max_num_tokens 32: every chunk
    is 4 sentences, nothing is truncated and (random_next_prob 0) every token is used once."""
    rng = random.Random(5)
    files, docs = [], []
    for f in range(n_files):
        file_docs = [make_doc(f * docs_per_file + k, 4 * rng.randint(1, 4), 7, rng) for k in range(docs_per_file)]
        files.append(str(write_blank_line_corpus(tmp_path / f"x{f}.txt", file_docs)))
        docs.extend(file_docs)
    c = cfg(files, max_seq_length=35, short_seq_prob=0.0, random_next_prob=0.0, max_predictions_per_seq=5)
    return files, docs, c


def used_tokens(items):
    tokens = Counter()
    for item in items:
        a, b = segments({**item, "input_ids": original_ids(item)})
        assert item["next_sentence_label"] == 0
        tokens.update(a + b)
    return tokens


def corpus_tokens(tokenizer, docs):
    return Counter(t for d in docs for t in tokenizer(" ".join(d), add_special_tokens=False)["input_ids"])


def test_one_pass_uses_every_token_once(tmp_path, vocab_tokenizer):  # noqa: F811
    files, docs, c = exact_corpus(tmp_path)
    items = take(PretrainingStream(c, vocab_tokenizer, files, seed=0, infinite=False))
    assert used_tokens(items) == corpus_tokens(vocab_tokenizer, docs)


@pytest.mark.parametrize("document_split", ["blank_line", "file"])
def test_two_ranks_are_disjoint_and_cover_the_corpus(tmp_path, vocab_tokenizer, document_split):  # noqa: F811
    files, docs, c = exact_corpus(tmp_path, n_files=4, docs_per_file=2)
    c = c.model_copy(update={"document_split": document_split})
    table = token_doc_table(vocab_tokenizer)
    per_rank = [take(PretrainingStream(c, vocab_tokenizer, files, seed=0, rank=r, world_size=2, infinite=False))
                for r in (0, 1)]
    tokens = [used_tokens(items) for items in per_rank]
    assert tokens[0] + tokens[1] == corpus_tokens(vocab_tokenizer, docs)
    docs_seen = [doc_of(list(t), table) for t in tokens]
    assert docs_seen[0] and docs_seen[1] and not docs_seen[0] & docs_seen[1]


def test_two_workers_cover_the_corpus_once(tmp_path, vocab_tokenizer):  # noqa: F811
    files, docs, c = exact_corpus(tmp_path)
    loader = build_pretraining_dataloader(c, vocab_tokenizer, files, batch_size=3, seed=0, infinite=False,
                                          num_workers=2)
    items = []
    for batch in loader:
        for row in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][row].sum())
            items.append({k: batch[k][row, :n].tolist() for k in ("input_ids", "token_type_ids", "labels")}
                         | {"next_sentence_label": int(batch["next_sentence_label"][row])})
    assert used_tokens(items) == corpus_tokens(vocab_tokenizer, docs)


def test_a_shard_without_documents_is_an_error_when_infinite(tmp_path, vocab_tokenizer):  # noqa: F811
    paths = [str(write_blank_line_corpus(tmp_path / f"{k}.txt", [make_doc(k, 5, 5, random.Random(k))])) for k in (0, 1)]
    c = cfg(paths, document_split="file")
    assert take(PretrainingStream(c, vocab_tokenizer, paths, seed=0, rank=2, world_size=3, infinite=False)) == []
    with pytest.raises(DataError, match=r"data.train_files: data shard 2 of 3 .* got no text: 2 file\(s\) hold 2 "):
        take(PretrainingStream(c, vocab_tokenizer, paths, seed=0, rank=2, world_size=3), 1)


# ----------------------------------------------------------------------------- resume


def state_roundtrip(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("num_workers, document_split, access", [
    (0, "blank_line", "index"), (2, "blank_line", "index"), (0, "file", "index"), (2, "blank_line", "stream"),
    (0, "file", "stream"),
])
def test_exact_resume(tmp_path, vocab_tokenizer, num_workers, document_split, access):  # noqa: F811
    files, _ = corpus(tmp_path, n_files=3, docs_per_file=4, sentences=(3, 10))
    c = cfg(files, whole_word_mask=True, short_seq_prob=0.3, document_split=document_split, corpus_access=access,
            interleave_documents=3)

    def loader():
        return build_pretraining_dataloader(c, vocab_tokenizer, files, batch_size=4, seed=7, num_workers=num_workers)

    one_pass = len(take(PretrainingStream(c, vocab_tokenizer, files, seed=7, infinite=False)))
    total = (2 * one_pass) // 4 + 10  # the run crosses pass boundaries
    reference = take(loader(), total)
    for stop in (3, total // 2):
        interrupted = loader()
        iterator = iter(interrupted)
        for _ in range(stop):
            next(iterator)
        state = state_roundtrip(interrupted.state_dict())
        del iterator, interrupted
        if access == "index":  # small: positions of open documents, not their tokens
            assert len(str(state)) < 60_000
        resumed = loader()
        resumed.load_state_dict(state)
        for expected, got in zip(reference[stop:], take(resumed, total - stop)):
            assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_resume_with_another_shard_layout_is_a_data_error(tmp_path, vocab_tokenizer):  # noqa: F811
    files, _ = corpus(tmp_path)
    stream = PretrainingStream(cfg(files), vocab_tokenizer, files, seed=0, rank=0, world_size=2)
    take(stream, 3)
    state = stream.state_dict()
    other = PretrainingStream(cfg(files), vocab_tokenizer, files, seed=0)
    other.load_state_dict(state)
    with pytest.raises(DataError, match="data.dataloader_num_workers: the saved data state is for shard 0 of 2"):
        iter(other)


# ----------------------------------------------------------------------------- inputs


def test_non_utf8_file_is_read(tmp_path, vocab_tokenizer):  # noqa: F811
    path = tmp_path / "bytes.txt"
    text = "\n".join(make_doc(0, 12, 6, random.Random(3)))
    path.write_bytes(text.encode() + b"\n\xff\xfe\x80 Dakoko \xe9dara.\n\n" + "\n".join(make_doc(1, 8, 6, random.Random(4))).encode())
    items = take(PretrainingStream(cfg([str(path)]), vocab_tokenizer, [str(path)], seed=0, infinite=False))
    assert len(items) > 5  # the bytes became U+FFFD (dropped by BERT's normaliser), not an error


def test_empty_files(tmp_path, vocab_tokenizer):  # noqa: F811
    empty = [tmp_path / "e1.txt", tmp_path / "e2.txt"]
    for p in empty:
        p.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"data.train_files: all 2 file\(s\) are empty"):
        build_pretraining_dataloader(cfg([str(p) for p in empty]), vocab_tokenizer, [str(p) for p in empty],
                                     batch_size=2, seed=0)
    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\n\t\n", encoding="utf-8")
    files = [str(empty[0]), str(blank)]
    with pytest.raises(DataError, match="data.train_files: no text to build pretraining instances from in 2 file"):
        take(PretrainingStream(cfg(files), vocab_tokenizer, files, seed=0), 1)
    good = str(write_blank_line_corpus(tmp_path / "good.txt", [make_doc(k, 6, 5, random.Random(k)) for k in (0, 1)]))
    assert take(PretrainingStream(cfg(files + [good]), vocab_tokenizer, files + [good], seed=0), 3)


# ----------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_gutenberg_books_stream(corpus_dir, gutenberg_tokenizer):  # noqa: F811
    files = sorted(str(p) for p in (corpus_dir / "gutenberg").glob("*.txt"))
    # one book = one document (with blank_line most paragraphs are single sentences -> random-next)
    c = DataConfig(train_files=files, document_split="file", max_seq_length=128, shuffle_buffer_size=50)
    items = take(PretrainingStream(c, gutenberg_tokenizer, files, seed=0, rank=1, world_size=2), 300)
    masked = sum(sum(label != -100 for label in x["labels"]) for x in items)
    assert masked / sum(len(x["input_ids"]) for x in items) == pytest.approx(0.15, abs=0.03)
    assert 0.38 < sum(x["next_sentence_label"] for x in items) / len(items) < 0.62
    for item in items:
        check_instance(item, gutenberg_tokenizer, 128)


@pytest.mark.realdata
def test_wikitext_articles_stream(corpus_dir, gutenberg_tokenizer):  # noqa: F811
    path = str(corpus_dir / "wikitext-2-raw" / "wiki.test.raw")
    c = DataConfig(train_files=[path], document_split="file", document_start_regex=r"^ = [^=].* = $",
                   max_seq_length=128, shuffle_buffer_size=50)
    items = take(PretrainingStream(c, gutenberg_tokenizer, [path], seed=0), 300)
    assert len(items) == 300
    for item in items:
        check_instance(item, gutenberg_tokenizer, 128)


def test_resume_refuses_a_changed_corpus_and_another_worker_count(tmp_path, vocab_tokenizer):  # noqa: F811
    files, _ = corpus(tmp_path)
    c = cfg(files)
    loader = build_pretraining_dataloader(c, vocab_tokenizer, files, batch_size=2, seed=0)
    iterator = iter(loader)
    next(iterator)
    state = state_roundtrip(loader.state_dict())
    with open(files[0], "a", encoding="utf-8") as f:  # the corpus changes under the run
        f.write("\n\nDakoko darara dakoko.\n")
    changed = build_pretraining_dataloader(c, vocab_tokenizer, files, batch_size=2, seed=0)
    changed.load_state_dict(state)
    with pytest.raises(DataError, match=r"^data.train_files: the corpus differs from the one this data state"):
        next(iter(changed))
    other = build_pretraining_dataloader(c, vocab_tokenizer, files, batch_size=2, seed=0, num_workers=2)
    with pytest.raises(DataError, match=r"^data.dataloader_num_workers: the saved data state is for 0 DataLoader"):
        other.load_state_dict(state)


def test_resume_accepts_the_same_corpus_copied_elsewhere(tmp_path, vocab_tokenizer):  # noqa: F811
    """The corpus's identity is its layout (sizes, documents, units), not its paths or times: a
    run resumes on its data copied elsewhere (a cluster job staging it to local disk), where it
    was refused (found by a helper); a state saved with the older path-and-time fingerprint
    still resumes on the same files."""
    import shutil
    from pathlib import Path

    from bert_recipes.data.index import build_index
    from bert_recipes.data.stream import check_saved_state

    (tmp_path / "here").mkdir()
    files, _ = corpus(tmp_path / "here")
    loader = build_pretraining_dataloader(cfg(files), vocab_tokenizer, files, batch_size=2, seed=0)
    iterator = iter(loader)
    next(iterator)
    state = state_roundtrip(loader.state_dict())
    expected = next(iterator)
    (tmp_path / "staged").mkdir()
    copies = [str(shutil.copy(path, tmp_path / "staged" / Path(path).name)) for path in files]  # new paths, times
    moved = build_pretraining_dataloader(cfg(copies), vocab_tokenizer, copies, batch_size=2, seed=0)
    moved.load_state_dict(state)
    got = next(iter(moved))
    assert all(torch.equal(got[key], expected[key]) for key in expected)
    index = build_index(files, cfg(files))
    saved = state["dataset_state"]  # the stream's own state (no DataLoader workers)
    assert saved["corpus"] == index.fingerprint and "epoch" in saved
    check_saved_state({**saved, "corpus": index.path_fingerprint}, cfg(files), (index.fingerprint, index.path_fingerprint))
    with pytest.raises(DataError, match="the corpus differs"):
        check_saved_state({**saved, "corpus": "another"}, cfg(files), (index.fingerprint, index.path_fingerprint))


def test_a_huge_google_format_line_is_cut_like_punkt_input(tmp_path, vocab_tokenizer):  # noqa: F811
    rng = random.Random(7)
    huge = " ".join(rng.choice(["dakoko", "darara", "dakomi"]) for _ in range(300_000)) + "."  # 2 MB, one line
    path = tmp_path / "google.txt"
    path.write_text(huge + "\n\n" + "\n".join(make_doc(1, 8, 6, rng)) + "\n", encoding="utf-8")
    c = cfg([str(path)], sentence_split="line", max_seq_length=128, max_predictions_per_seq=20)
    items = take(PretrainingStream(c, vocab_tokenizer, [str(path)], seed=0), 200)
    assert len(items) == 200 and all(len(x["input_ids"]) <= 128 for x in items)

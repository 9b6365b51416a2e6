"""Statistical tests of the stream against the definitions of google-research/bert's
create_pretraining_data.py: every pass is one permutation of all documents, random-next B
is uniform over all other documents, the short target is drawn per document; and the
corpus-scale properties: shards read only their own documents, held-out instances do not
depend on the number of processes.

Tolerances are 4 binomial standard deviations of the sample at hand (seeds fixed).
"""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from bert_recipes.data import PretrainingStream, build_eval_batches, build_pretraining_dataloader
from bert_recipes.recipe import DataConfig

from tests.data_fixtures import make_doc, vocab_tokenizer  # noqa: F401
from tests.test_loader import corpus_tokens, exact_corpus, used_tokens

BOOKS = (10, 20, 40, 80)  # documents per file: 150 documents of unequal files


def google_format(tmp_path, books=BOOKS, sentences=(4, 12), seed=0):
    """Files in Google's input format (a sentence per line, blank lines between documents)."""
    rng = random.Random(seed)
    files, doc_file = [], []
    for f, n in enumerate(books):
        docs = [make_doc((f * 7 + k) % 40, rng.randint(*sentences), rng.randint(4, 9), rng) for k in range(n)]
        path = tmp_path / f"book{f}.txt"
        path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
        files.append(str(path))
        doc_file += [f] * n
    return files, np.array(doc_file)


def cfg(files, **kw):
    values = dict(max_seq_length=64, max_predictions_per_seq=10, sentence_split="line", shuffle_buffer_size=0)
    values.update(kw)
    return DataConfig(train_files=files, **values)


def origins(files, c, tokenizer, seed=0, **kw):
    return list(PretrainingStream(c, tokenizer, files, seed=seed, infinite=False, with_origin=True, **kw))


def within(observed: float, expected: float, n: int, sigmas: float = 4.0) -> bool:
    return abs(observed - expected) <= sigmas * np.sqrt(max(expected * (1 - expected), 1e-12) / n)


def test_random_next_b_is_uniform_over_all_other_documents(tmp_path, vocab_tokenizer):  # noqa: F811
    files, doc_file = google_format(tmp_path)
    n_docs = len(doc_file)
    sizes = np.bincount(doc_file)
    items = [x for seed in range(4) for x in origins(files, cfg(files), vocab_tokenizer, seed=seed)]
    random_next = [x for x in items if x["next_sentence_label"] == 1]
    a = np.array([x["a_document"] for x in random_next])
    b = np.array([x["b_document"] for x in random_next])
    assert len(random_next) > 500 and not np.any(a == b)  # never A's own document
    same_file = np.mean(doc_file[a] == doc_file[b])
    expected_same = np.mean((sizes[doc_file[a]] - 1) / (n_docs - 1))  # uniform over the N - 1 others
    assert within(same_file, expected_same, len(a)), (same_file, expected_same)
    earlier = np.mean(b < a)
    assert within(earlier, np.mean(a / (n_docs - 1)), len(a)), earlier  # no direction in file order
    counts = np.bincount(b, minlength=n_docs)  # every document is a B source about equally often
    assert counts.min() > 0 and np.std(counts) < 2.5 * np.sqrt(counts.mean())
    isnext = [x for x in items if x["next_sentence_label"] == 0]
    assert all(x["a_document"] == x["b_document"] for x in isnext)


def test_each_pass_is_one_permutation_of_all_documents(tmp_path, vocab_tokenizer):  # noqa: F811
    files, doc_file = google_format(tmp_path)
    c = cfg(files, random_next_prob=0.0, short_seq_prob=0.0)
    passes = [origins(files, c, vocab_tokenizer, seed=0), origins(files, c, vocab_tokenizer, seed=1)]
    for items in passes:
        docs = [x["a_document"] for x in items]
        assert set(docs) == set(range(len(doc_file)))
        rho = spearmanr(np.arange(len(docs)), docs).statistic  # order does not follow file position
        assert abs(rho) < 4 / np.sqrt(len(docs)), rho
        assert len({int(doc_file[d]) for d in docs[:64]}) == len(BOOKS)  # the first batches mix every file
    assert [x["a_document"] for x in passes[0]] != [x["a_document"] for x in passes[1]]


def test_short_target_is_drawn_once_per_document(tmp_path, vocab_tokenizer):  # noqa: F811
    files, doc_file = google_format(tmp_path, sentences=(20, 30))
    c = cfg(files, short_seq_prob=0.3)
    targets: dict[int, set] = {}
    for seed in range(3):
        for x in origins(files, c, vocab_tokenizer, seed=seed):
            targets.setdefault((seed, x["a_document"]), set()).add(x["target_length"])
    assert all(len(t) == 1 for t in targets.values())  # Google: one target_seq_length per document
    short = np.mean([t != {61} for t in targets.values()])
    assert within(short, 0.3, len(targets)), short
    per_instance = origins(files, cfg(files, short_seq_prob=0.3, short_seq_scope="instance"), vocab_tokenizer)
    by_doc: dict[int, set] = {}
    for x in per_instance:
        by_doc.setdefault(x["a_document"], set()).add(x["target_length"])
    assert np.mean([len(t) > 1 for t in by_doc.values()]) > 0.5


def test_books_are_interleaved_from_the_first_batch(tmp_path, vocab_tokenizer):  # noqa: F811
    """``document_split: file`` (one book = one document): instances come from many books at
    once, not one book after another."""
    files, _ = google_format(tmp_path, books=(5,) * 8, sentences=(20, 30))
    c = cfg(files, document_split="file", shuffle_buffer_size=0)
    items = list(PretrainingStream(c, vocab_tokenizer, files, seed=0, infinite=False, with_origin=True))
    assert len({x["a_document"] for x in items[:32]}) == 8
    lone = cfg(files, document_split="file", interleave_documents=1)
    items = list(PretrainingStream(lone, vocab_tokenizer, files, seed=0, infinite=False, with_origin=True))
    assert len({x["a_document"] for x in items[:32]}) <= 2


# ----------------------------------------------------------------------------- shards


@pytest.mark.parametrize("num_shards", [1, 4, 16])
def test_each_shard_reads_only_its_own_documents(tmp_path, vocab_tokenizer, num_shards):  # noqa: F811
    files, doc_file = google_format(tmp_path, books=(40,) * 8)
    c = cfg(files)
    seen, own_bytes = [], []
    for shard in range(num_shards):
        stream = PretrainingStream(c, vocab_tokenizer, files, seed=3, rank=shard, world_size=num_shards,
                                   infinite=False, with_origin=True)
        seen.append({x["a_document"] for x in stream})
        own_bytes.append(stream.corpus.bytes_read["own"])
    total = int(stream.corpus.index.document_bytes().sum())
    assert set().union(*seen) == set(range(len(doc_file)))
    assert sum(len(s) for s in seen) == len(doc_file)  # disjoint
    assert sum(own_bytes) == total  # every document read once, by its shard only
    assert max(own_bytes) <= 1.5 * total / num_shards


def test_ranks_times_workers_cover_one_pass_exactly(tmp_path, vocab_tokenizer):  # noqa: F811
    files, docs, c = exact_corpus(tmp_path, n_files=4, docs_per_file=4)  # nothing truncated, no random B
    items = []
    for rank in (0, 1):
        loader = build_pretraining_dataloader(c, vocab_tokenizer, files, batch_size=3, seed=0, rank=rank,
                                              world_size=2, infinite=False, num_workers=2)
        for batch in loader:
            for row in range(batch["input_ids"].shape[0]):
                n = int(batch["attention_mask"][row].sum())
                items.append({k: batch[k][row, :n].tolist() for k in ("input_ids", "token_type_ids", "labels")}
                             | {"next_sentence_label": int(batch["next_sentence_label"][row])})
    assert used_tokens(items) == corpus_tokens(vocab_tokenizer, docs)  # 2 ranks x 2 workers: each token once


# ----------------------------------------------------------------------------- held-out


def instances_of(batches):
    """(input_ids, labels, next_sentence_label) of every instance, padded or packed batches."""
    from bert_recipes.inspect_batches import batch_examples

    return [(tuple(x for x, m in zip(example["input_ids"], example["attention_mask"]) if m),
             tuple(x for x, m in zip(example["labels"], example["attention_mask"]) if m), example["next_sentence_label"])
            for batch in batches for example in batch_examples(batch)]


def test_held_out_instances_do_not_depend_on_the_number_of_processes(tmp_path, vocab_tokenizer):  # noqa: F811
    files, _ = google_format(tmp_path, books=(10, 13))
    c = cfg(files)
    single = instances_of(build_eval_batches(c, vocab_tokenizer, files, batch_size=8, seed=5, max_samples=23))
    assert len(single) == 23
    for world in (2, 3):
        parts = [instances_of(build_eval_batches(c, vocab_tokenizer, files, batch_size=8, seed=5, rank=r,
                                                 world_size=world, max_samples=23)) for r in range(world)]
        assert sorted(sum(parts, [])) == sorted(single)


def test_single_sentence_documents_are_reported_from_the_index(tmp_path, vocab_tokenizer, caplog):  # noqa: F811
    path = tmp_path / "singles.txt"
    rng = random.Random(0)
    docs = [make_doc(k, 1 if k % 2 else 6, 5, rng) for k in range(40)]
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="bert_recipes"):
        PretrainingStream(cfg([str(path)]), vocab_tokenizer, [str(path)], seed=0)  # nothing read yet
    assert "20 of 40 documents in the corpus have a single sentence" in caplog.text

"""Property tests (hypothesis) over random documents and settings: instances + masking + stream."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bert_recipes.data import PretrainingStream
from bert_recipes.data.instances import InstanceBuilder, RandomNextBuffer
from bert_recipes.data.masking import MaskingVocab, create_masked_lm_predictions, num_to_predict
from bert_recipes.recipe import DataConfig

from tests.data_fixtures import doc_words, vocab_tokenizer, write_blank_line_corpus  # noqa: F401

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
V, FIRST_PIECE = 200, 150  # ids >= FIRST_PIECE are '##' pieces


def vocab():
    special = np.zeros(V, dtype=bool)
    special[[PAD, CLS, SEP, MASK]] = True
    continuation = np.arange(V) >= FIRST_PIECE
    return MaskingVocab(MASK, special, np.arange(5, V, dtype=np.int64), continuation)


sentence = st.lists(st.integers(5, V - 1), min_size=1, max_size=40)
documents = st.lists(st.lists(sentence, min_size=1, max_size=8), min_size=2, max_size=4)


@st.composite
def data_settings(draw):
    max_seq_length = draw(st.integers(8, 64))
    return dict(
        max_seq_length=max_seq_length,
        short_seq_prob=draw(st.floats(0, 1)),
        random_next_prob=draw(st.floats(0, 1)),
        masked_lm_prob=draw(st.floats(0.01, 0.9)),
        max_predictions_per_seq=draw(st.integers(1, max_seq_length - 3)),
        whole_word_mask=draw(st.booleans()),
    )


def check_words_intact(ids, labels):
    chosen = labels != -100
    for pos in range(1, len(ids)):
        if ids[pos] >= FIRST_PIECE and ids[pos - 1] not in (CLS, SEP):
            assert chosen[pos] == chosen[pos - 1]


@settings(max_examples=150, deadline=None)
@given(docs=documents, s=data_settings(), seed=st.integers(0, 2**32 - 1))
def test_instances_and_masking_properties(docs, s, seed):
    rng = np.random.default_rng(seed)
    builder = InstanceBuilder(max_seq_length=s["max_seq_length"], short_seq_prob=s["short_seq_prob"],
                              random_next_prob=s["random_next_prob"], cls_token_id=CLS, sep_token_id=SEP)
    buffer = RandomNextBuffer(8, s["max_seq_length"] - 3)
    mv = vocab()
    for key, doc in enumerate(docs):
        buffer.add_document(key, doc, rng)
    for key, doc in enumerate(docs):
        cursor, count = builder.start(key, doc, rng), 0
        flat = [t for sent in doc for t in sent]
        while (pair := builder.next_instance(cursor, buffer, rng)) is not None:
            count += 1
            assert count <= 10 * len(flat) + 10
            ids, types = pair.input_ids, pair.token_type_ids
            assert len(ids) <= s["max_seq_length"]
            seps = np.flatnonzero(ids == SEP)
            assert ids[0] == CLS and len(seps) == 2 and seps[1] == len(ids) - 1
            assert (types == (np.arange(len(ids)) > seps[0])).all()  # 0 through the first [SEP]
            a, b = ids[1 : seps[0]].tolist(), ids[seps[0] + 1 : -1].tolist()
            assert a and b
            assert any(flat[i : i + len(a)] == a for i in range(len(flat)))  # A is text of its document
            masked, labels = create_masked_lm_predictions(
                ids, mv, rng, masked_lm_prob=s["masked_lm_prob"],
                max_predictions_per_seq=s["max_predictions_per_seq"], whole_word_mask=s["whole_word_mask"])
            special = np.isin(ids, [CLS, SEP])
            assert (labels[special] == -100).all() and (masked[special] == ids[special]).all()
            assert (masked[labels == -100] == ids[labels == -100]).all()
            assert (labels[labels != -100] == ids[labels != -100]).all()
            n = int((labels != -100).sum())
            assert n <= num_to_predict(len(ids), s["masked_lm_prob"], s["max_predictions_per_seq"])
            if not s["whole_word_mask"]:
                assert n == min(num_to_predict(len(ids), s["masked_lm_prob"], s["max_predictions_per_seq"]),
                                int((~special).sum()))
            else:
                check_words_intact(ids, labels)
        assert count >= 1


WORDS = doc_words(0) + doc_words(1) + ["walk", "walking", "unbreakable", "zzzq"]


@st.composite
def text_documents(draw):
    def sentence_text():
        words = draw(st.lists(st.sampled_from(WORDS), min_size=1, max_size=30))
        return " ".join(words) + draw(st.sampled_from([".", "!", "?", ""]))

    return [[sentence_text() for _ in range(draw(st.integers(1, 6)))] for _ in range(draw(st.integers(2, 4)))]


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(docs=text_documents(), s=data_settings(), seed=st.integers(0, 1000))
def test_stream_properties(vocab_tokenizer, docs, s, seed):  # noqa: F811
    with tempfile.TemporaryDirectory() as tmp:
        path = str(write_blank_line_corpus(Path(tmp) / "c.txt", docs))
        cfg = DataConfig(train_files=[path], shuffle_buffer_size=random.Random(seed).choice([0, 5]),
                         random_next_buffer_size=4, **s)
        items = []
        for item in PretrainingStream(cfg, vocab_tokenizer, [path], seed=seed):
            items.append(item)
            if len(items) == 25:
                break
    specials = {vocab_tokenizer.cls_token_id, vocab_tokenizer.sep_token_id, vocab_tokenizer.pad_token_id}
    for item in items:
        ids, types, labels = item["input_ids"], item["token_type_ids"], item["labels"]
        assert len(ids) == len(types) == len(labels) <= s["max_seq_length"]
        first_b = types.index(1)
        assert types == [0] * first_b + [1] * (len(ids) - first_b)
        assert [i for i, t in enumerate(ids) if t == vocab_tokenizer.sep_token_id] == [first_b - 1, len(ids) - 1]
        for token, label in zip(ids, labels):
            if token in specials:
                assert label == -100
            if label == -100:
                assert token != vocab_tokenizer.mask_token_id

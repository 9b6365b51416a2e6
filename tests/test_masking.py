"""MLM masking: bert_recipes.data.masking (Google's create_masked_lm_predictions)."""

from __future__ import annotations

import numpy as np
import pytest

from bert_recipes.data.masking import MaskingVocab, create_masked_lm_predictions, num_to_predict

from tests.data_fixtures import vocab_tokenizer  # noqa: F401

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
V = 1000


def plain_vocab(continuation_ids=()):
    special = np.zeros(V, dtype=bool)
    special[[PAD, CLS, SEP, MASK]] = True
    continuation = np.zeros(V, dtype=bool)
    continuation[list(continuation_ids)] = True
    return MaskingVocab(MASK, special, np.arange(5, V, dtype=np.int64), continuation)


def sequence(rng, len_a, len_b, pad=0):
    body = lambda n: rng.integers(5, V, size=n).tolist()  # noqa: E731
    return np.array([CLS] + body(len_a) + [SEP] + body(len_b) + [SEP] + [PAD] * pad, dtype=np.int64)


def test_num_to_predict_follows_google():
    assert num_to_predict(128, 0.15, 20) == 19  # round(19.2)
    assert num_to_predict(512, 0.15, 20) == 20  # capped
    assert num_to_predict(5, 0.15, 20) == 1  # at least one
    assert num_to_predict(10, 0.15, 20) == 2  # round(1.5) -> 2 (banker's rounding, as Python 3)


def test_masking_rate_is_masked_lm_prob_of_the_tokens():
    vocab, rng = plain_vocab(), np.random.default_rng(0)
    chosen = non_special = 0
    for _ in range(400):
        ids = sequence(rng, 100, 97)  # 200 tokens: round(30.0) = 30 predictions, no cap
        _, labels = create_masked_lm_predictions(ids, vocab, rng, masked_lm_prob=0.15, max_predictions_per_seq=197)
        assert (labels != -100).sum() == 30
        chosen += (labels != -100).sum()
        non_special += 197
    assert chosen / non_special == pytest.approx(0.15, abs=0.005)


def test_max_predictions_per_seq_caps_the_count():
    vocab, rng = plain_vocab(), np.random.default_rng(1)
    for _ in range(50):
        _, labels = create_masked_lm_predictions(sequence(rng, 60, 60), vocab, rng, masked_lm_prob=0.15,
                                                 max_predictions_per_seq=7)
        assert (labels != -100).sum() == 7


def test_80_10_10_split():
    vocab, rng = plain_vocab(), np.random.default_rng(2)
    masked = kept = randomised = 0
    for _ in range(600):
        ids = sequence(rng, 100, 100)
        out, labels = create_masked_lm_predictions(ids, vocab, rng, masked_lm_prob=0.15, max_predictions_per_seq=200)
        at = labels != -100
        masked += (out[at] == MASK).sum()
        kept += (out[at] == ids[at]).sum()
        randomised += ((out[at] != MASK) & (out[at] != ids[at])).sum()
    total = masked + kept + randomised
    assert total == 600 * 30  # round(203 * 0.15)
    assert masked / total == pytest.approx(0.8, abs=0.01)
    assert kept / total == pytest.approx(0.1, abs=0.01)  # (+ 1/995 random draws of the same id)
    assert randomised / total == pytest.approx(0.1, abs=0.01)


def test_specials_and_padding_never_masked_labels_only_at_changes():
    vocab, rng = plain_vocab(), np.random.default_rng(3)
    for _ in range(300):
        ids = sequence(rng, int(rng.integers(1, 20)), int(rng.integers(1, 20)), pad=int(rng.integers(0, 9)))
        out, labels = create_masked_lm_predictions(ids, vocab, rng, masked_lm_prob=0.5, max_predictions_per_seq=40)
        special = np.isin(ids, [PAD, CLS, SEP])
        assert (labels[special] == -100).all() and (out[special] == ids[special]).all()
        unlabelled = labels == -100
        assert (out[unlabelled] == ids[unlabelled]).all()  # nothing changes outside predictions
        assert (labels[~unlabelled] == ids[~unlabelled]).all()  # labels are the original ids
        replaced = ~unlabelled & (out != MASK)
        assert not np.isin(out[replaced], [PAD, UNK, CLS, SEP, MASK]).any()  # random ids are never special


def test_only_specials_means_no_prediction():
    ids = np.array([CLS, SEP, SEP, PAD])
    out, labels = create_masked_lm_predictions(ids, plain_vocab(), np.random.default_rng(0), masked_lm_prob=0.15,
                                               max_predictions_per_seq=5)
    assert (labels == -100).all() and (out == ids).all()


def test_whole_word_masking_keeps_pieces_together():
    pieces = list(range(900, 1000))  # '##' ids
    vocab, rng = plain_vocab(pieces), np.random.default_rng(4)
    for _ in range(300):
        words = [[int(rng.integers(5, 900))] + rng.integers(900, 1000, size=int(rng.integers(0, 3))).tolist()
                 for _ in range(30)]
        body = [t for w in words for t in w]
        ids = np.array([CLS] + body[:40] + [SEP] + body[40:] + [SEP], dtype=np.int64)
        _, labels = create_masked_lm_predictions(ids, vocab, rng, masked_lm_prob=0.15, max_predictions_per_seq=20,
                                                 whole_word_mask=True)
        chosen = labels != -100
        assert 0 < chosen.sum() <= num_to_predict(len(ids), 0.15, 20)
        # a word = a non-'##' candidate plus the '##' candidates right after it
        start = None
        for pos in range(1, len(ids)):
            is_piece = ids[pos] >= 900 and ids[pos - 1] not in (CLS, SEP)
            if ids[pos] in (CLS, SEP):
                continue
            if not is_piece:
                start = pos
            assert chosen[pos] == chosen[start], f"word at {start} split at {pos}: {ids.tolist()} {labels.tolist()}"


def test_whole_word_piece_after_sep_is_its_own_word():
    vocab = plain_vocab([950])
    ids = np.array([CLS, 10, 11, SEP, 950, 12, SEP])
    for seed in range(40):
        _, labels = create_masked_lm_predictions(ids, vocab, np.random.default_rng(seed), masked_lm_prob=0.15,
                                                 max_predictions_per_seq=1, whole_word_mask=True)
        assert (labels != -100).sum() == 1  # the '##' after [SEP] never drags a word of segment A along


def test_masking_vocab_from_tokenizer(vocab_tokenizer):  # noqa: F811
    vocab = MaskingVocab.from_tokenizer(vocab_tokenizer)
    size = len(vocab_tokenizer)
    assert vocab.is_special.shape == vocab.is_continuation.shape == (size,)
    specials = {vocab_tokenizer.convert_tokens_to_ids(t) for t in ["[PAD]", "[CLS]", "[SEP]", "[MASK]"]}
    assert set(np.flatnonzero(vocab.is_special)) == specials  # [UNK] stays maskable, as in Google's code
    assert not set(vocab.random_token_ids.tolist()) & set(vocab_tokenizer.all_special_ids)
    assert vocab.is_continuation[vocab_tokenizer.convert_tokens_to_ids("##break")]
    assert not vocab.is_continuation[vocab_tokenizer.convert_tokens_to_ids("un")]
    assert vocab.mask_token_id == vocab_tokenizer.mask_token_id


def test_deterministic_given_the_generator_state():
    vocab = plain_vocab(range(900, 1000))
    ids = sequence(np.random.default_rng(9), 50, 50)
    runs = [create_masked_lm_predictions(ids, vocab, np.random.default_rng(5), masked_lm_prob=0.15,
                                         max_predictions_per_seq=20, whole_word_mask=True) for _ in range(2)]
    assert all((a == b).all() for a, b in zip(*runs))

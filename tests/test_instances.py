"""NSP instances: bert_recipes.data.instances (Google's create_instances_from_document)."""

from __future__ import annotations

import numpy as np
import pytest

from bert_recipes.data.instances import InstanceBuilder, RandomNextBuffer, truncate_seq_pair

CLS, SEP = 2, 3


def google_truncate(a, b, max_num_tokens, rng):
    """google-research/bert truncate_seq_pair, verbatim (with a numpy rng)."""
    a, b = list(a), list(b)
    while len(a) + len(b) > max_num_tokens:
        trunc = a if len(a) > len(b) else b
        if rng.random() < 0.5:
            del trunc[0]
        else:
            trunc.pop()
    return a, b


def is_slice(part, whole):
    return any(whole[i : i + len(part)] == part for i in range(len(whole) - len(part) + 1))


@pytest.mark.parametrize("len_a, len_b, limit", [(3, 4, 10), (50, 3, 10), (3, 50, 10), (20, 20, 9), (1, 700, 125),
                                                 (700, 1, 125), (10, 11, 5), (11, 10, 5), (64, 64, 125)])
def test_truncate_seq_pair_matches_google(len_a, len_b, limit):
    a, b = list(range(100, 100 + len_a)), list(range(1000, 1000 + len_b))
    rng = np.random.default_rng(0)
    fronts = []
    for _ in range(200):
        ta, tb = truncate_seq_pair(a, b, limit, rng)
        ga, gb = google_truncate(a, b, limit, rng)
        assert (len(ta), len(tb)) == (len(ga), len(gb))  # same amounts removed from each side
        assert is_slice(ta, a) and is_slice(tb, b) and len(ta) >= 1 and len(tb) >= 1
        fronts.append(a.index(ta[0]) if len(ta) < len(a) else None)
    removed = len(a) - len(ga)
    if removed >= 10:  # front/back removals are Binomial(removed, 1/2)
        assert np.mean([f for f in fronts if f is not None]) == pytest.approx(removed / 2, rel=0.2)


def make_docs(n_docs, n_sentences, lengths, seed=0):
    """Doc k: sentences of ids k*10_000 + running number (so origin and order are readable)."""
    rng = np.random.default_rng(seed)
    docs = []
    for k in range(n_docs):
        counter = k * 10_000 + 10
        doc = []
        for _ in range(n_sentences):
            n = int(rng.integers(lengths[0], lengths[1] + 1))
            doc.append(list(range(counter, counter + n)))
            counter += n
        docs.append(doc)
    return docs


def all_instances(docs, builder, buffer, rng):
    out = []
    for key, doc in enumerate(docs):
        buffer.add_document(key, doc, rng)
    for key, doc in enumerate(docs):
        cursor = builder.start(key, doc, rng)
        while (pair := builder.next_instance(cursor, buffer, rng)) is not None:
            out.append((key, pair))
    return out


def split(pair):
    ids, types = pair.input_ids.tolist(), pair.token_type_ids.tolist()
    first_b = types.index(1)
    assert ids[0] == CLS and ids[first_b - 1] == SEP and ids[-1] == SEP
    assert types == [0] * first_b + [1] * (len(ids) - first_b)
    return ids[1 : first_b - 1], ids[first_b:-1]


def builder(max_seq_length=64, short_seq_prob=0.0, random_next_prob=0.5):
    return InstanceBuilder(max_seq_length=max_seq_length, short_seq_prob=short_seq_prob,
                           random_next_prob=random_next_prob, cls_token_id=CLS, sep_token_id=SEP)


def test_instances_structure_labels_and_origins():
    docs = make_docs(6, 200, (3, 12))
    rng = np.random.default_rng(1)
    pairs = all_instances(docs, builder(), RandomNextBuffer(100, 61), rng)
    labels = [p.next_sentence_label for _, p in pairs]
    assert 0.4 < np.mean(labels) < 0.6
    for key, pair in pairs:
        a, b = split(pair)
        assert len(pair.input_ids) <= 64 and a and b
        assert {t // 10_000 for t in a} == {key}  # A comes from the document
        if pair.next_sentence_label == 0:  # B continues A in the same document
            assert {t // 10_000 for t in b} == {key} and b[0] > a[-1]
            assert a == list(range(a[0], a[-1] + 1)) and b == list(range(b[0], b[-1] + 1))
        else:  # B is contiguous text of another document
            (other,) = {t // 10_000 for t in b}
            assert other != key and b == list(range(b[0], b[-1] + 1))
            assert pair.a_document == key and pair.b_document == other


def test_every_sentence_is_used_and_unused_segments_are_put_back():
    docs = make_docs(4, 30, (5, 5))  # 5-token sentences and max_num_tokens 60: never truncated
    for random_next_prob in (0.0, 0.5, 1.0):
        pairs = all_instances(docs, builder(63, random_next_prob=random_next_prob), RandomNextBuffer(50, 60),
                              np.random.default_rng(2))
        for key, doc in enumerate(docs):
            seen = set()
            for k, pair in pairs:
                if k == key:
                    a, b = split(pair)
                    seen.update(a + (b if pair.next_sentence_label == 0 else []))
            assert seen == {t for s in doc for t in s}, random_next_prob


def test_short_seq_prob_gives_shorter_targets():
    docs = make_docs(3, 200, (1, 3))
    pairs = all_instances(docs, builder(max_seq_length=128, short_seq_prob=1.0), RandomNextBuffer(50, 125),
                          np.random.default_rng(3))
    lengths = [len(p.input_ids) for _, p in pairs]
    assert min(lengths) < 20 and np.median(lengths) < 100 and max(lengths) <= 128
    long = all_instances(docs, builder(max_seq_length=128), RandomNextBuffer(50, 125), np.random.default_rng(3))
    assert np.median([len(p.input_ids) for _, p in long]) >= 120


def test_a_700_token_sentence_fits_max_seq_length_128():
    docs = [[list(range(10, 710))], [list(range(20_000, 20_700)), list(range(30_000, 30_005))]]
    pairs = all_instances(docs, builder(max_seq_length=128), RandomNextBuffer(10, 125), np.random.default_rng(4))
    assert pairs and all(len(p.input_ids) <= 128 for _, p in pairs)
    assert all(len(split(p)[0]) >= 1 and len(split(p)[1]) >= 1 for _, p in pairs)


def test_single_sentence_document_is_random_next_and_never_from_its_own_document():
    b = builder()
    buffer = RandomNextBuffer(10, 61)
    rng = np.random.default_rng(5)
    doc = [[11, 12, 13]]
    buffer.add_document(7, doc, rng)
    assert b.next_instance(b.start(7, doc, rng), buffer, rng) is None  # only itself to draw from: skipped
    assert b.skipped_chunks == 1
    buffer.add_document(8, [[21, 22]], rng)
    pair = b.next_instance(b.start(7, doc, rng), buffer, rng)
    assert split(pair) == ([11, 12, 13], [21, 22]) and pair.next_sentence_label == 1 and b.skipped_chunks == 1


def test_short_seq_target_is_drawn_once_per_document_or_per_instance():
    docs = make_docs(40, 60, (2, 6))
    for scope in ("document", "instance"):
        b = InstanceBuilder(max_seq_length=64, short_seq_prob=0.5, random_next_prob=0.5, cls_token_id=CLS,
                            sep_token_id=SEP, short_seq_scope=scope)
        pairs = all_instances(docs, b, RandomNextBuffer(100, 61), np.random.default_rng(8))
        targets = {}
        for key, pair in pairs:
            targets.setdefault(key, set()).add(pair.target_length)
        if scope == "document":  # Google: one target_seq_length per document
            assert all(len(t) == 1 for t in targets.values())
            short = np.mean([t != {61} for t in targets.values()])
            assert 0.25 < short < 0.75  # P = 0.5 per document
        else:
            assert np.mean([len(t) > 1 for t in targets.values()]) > 0.9


def test_random_next_buffer_is_bounded_and_samples_other_documents():
    buffer = RandomNextBuffer(capacity=8, max_num_tokens=10)
    rng = np.random.default_rng(6)
    big = [list(range(i * 7, i * 7 + 7)) for i in range(100)]  # 700 tokens: round(70) entries wanted
    buffer.add_document(0, big, rng)
    assert len(buffer.entries) == 4  # at most half the capacity per document
    assert all(sum(map(len, sentences)) <= 10 for _, sentences in buffer.entries)
    assert buffer.random_b(0, 5, rng) is None  # nothing but document 0
    for key in range(1, 20):
        buffer.add_document(key, [[key * 100, key * 100 + 1]], rng)
    assert len(buffer.entries) == 8
    assert all(buffer.random_b(5, 1, rng)[0][0] // 100 != 5 for _ in range(100))
    state = buffer.state_dict()
    restored = RandomNextBuffer(8, 10)
    restored.load_state_dict(state)
    assert restored.entries == buffer.entries

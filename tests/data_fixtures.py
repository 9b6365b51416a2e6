"""Fixtures and helpers for the pretraining-data tests (imported by tests/test_*.py).

Synthetic corpora give every document its own vocabulary: document ``k`` uses words that
start with a two-letter tag (``tag(k)``), so the document a token came from is known.
The explicit-vocabulary tokenizer makes each such word exactly one token.
"""

from __future__ import annotations

import itertools
import random
import string
from pathlib import Path

import pytest

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
SYLLABLES = ["ko", "ra", "mi", "tu", "pe", "lo", "zi", "ne"]
N_TAGS = 40
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CORPUS = SHARED_DATA / "corpus"


def tag(k: int) -> str:
    """Two-letter tag of document ``k`` (0 <= k < N_TAGS)."""
    return string.ascii_lowercase[k // 26 + 3] + string.ascii_lowercase[k % 26]


def doc_words(k: int) -> list[str]:
    """The 64 words of document ``k``."""
    return [tag(k) + a + b for a, b in itertools.product(SYLLABLES, SYLLABLES)]


def make_doc(k: int, n_sentences: int, words_per_sentence: int, rng: random.Random) -> list[str]:
    """Sentences of document ``k``: ``words_per_sentence`` random words of the document + '.'."""
    words = doc_words(k)
    return [" ".join(rng.choice(words) for _ in range(words_per_sentence)).capitalize() + "." for _ in range(n_sentences)]


def write_blank_line_corpus(path: Path, docs: list[list[str]]) -> Path:
    """One text file; documents separated by blank lines, one sentence per line."""
    path.write_text("\n\n".join("\n".join(doc) for doc in docs) + "\n", encoding="utf-8")
    return path


def make_vocab_tokenizer(extra_words=()):
    """A BERT tokenizer whose vocabulary holds every synthetic word as one token."""
    from transformers import BertTokenizer

    pieces = list(SPECIALS) + [".", ",", "!", "?", "'", '"', ";", ":", "-", "(", ")"]
    pieces += list(string.ascii_lowercase) + ["##" + c for c in string.ascii_lowercase]
    pieces += [w for k in range(N_TAGS) for w in doc_words(k)]
    pieces += [w for w in extra_words if w not in pieces]
    vocab = {piece: i for i, piece in enumerate(dict.fromkeys(pieces))}
    return BertTokenizer(vocab=vocab, do_lower_case=True)


def token_doc_table(tokenizer) -> dict[int, int]:
    """token id -> synthetic document number."""
    table = {}
    for k in range(N_TAGS):
        for word in doc_words(k):
            table[tokenizer.convert_tokens_to_ids(word)] = k
    return table


def segments(instance) -> tuple[list[int], list[int]]:
    """(A, B) token ids of an instance ``[CLS] A [SEP] B [SEP]`` using its token_type_ids."""
    ids, types = list(instance["input_ids"]), list(instance["token_type_ids"])
    n = len(ids) if "attention_mask" not in instance else int(sum(instance["attention_mask"]))
    first_b = types.index(1)
    return ids[1 : first_b - 1], ids[first_b : n - 1]


def original_ids(instance) -> list[int]:
    """Undo the masking: label where one is set, else the input id."""
    return [l if l != -100 else i for i, l in zip(instance["input_ids"], instance["labels"])]


@pytest.fixture(scope="session")
def vocab_tokenizer():
    return make_vocab_tokenizer(extra_words=["un", "##break", "##able", "##s", "walk", "##ing"])


@pytest.fixture(scope="session")
def corpus_dir():
    if not (CORPUS / "gutenberg").is_dir():
        pytest.skip(f"real corpus not found at {CORPUS} (../shared/data is only present in the dev setup)")
    return CORPUS


@pytest.fixture(scope="session")
def gutenberg_tokenizer(corpus_dir):
    from bert_recipes.tokenizer import train_wordpiece

    files = [str(corpus_dir / "gutenberg" / name) for name in ("austen-persuasion.txt", "blake-poems.txt")]
    return train_wordpiece(files, vocab_size=4000)

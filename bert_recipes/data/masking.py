"""Masked-LM masking: follows create_masked_lm_predictions of google-research/bert
(create_pretraining_data.py), vectorised with numpy.

For one instance ``[CLS] A [SEP] B [SEP]``:

1. candidates are all positions except special tokens ([CLS], [SEP], [PAD], [MASK]);
   with whole-word masking a candidate is a *word*: a token plus the ``##`` pieces that
   follow it (a ``##`` piece right after a non-candidate starts its own word; Google's
   code would glue it to the word before the [SEP]);
2. the candidates are shuffled;
3. ``num_to_predict = min(max_predictions_per_seq, max(1, round(len(tokens) * masked_lm_prob)))``
   where ``len(tokens)`` counts the whole sequence, special tokens included (as Google);
4. words are taken in shuffled order, skipping a word that would overshoot
   ``num_to_predict``, until ``num_to_predict`` tokens are chosen;
5. each chosen token becomes [MASK] with probability 0.8, a random non-special vocabulary
   token with probability 0.1, and stays unchanged with probability 0.1;
6. ``labels`` hold the original id at chosen positions and -100 elsewhere.

The function is pure: its output depends only on its inputs and the state of ``rng``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

IGNORE_INDEX = -100
MASK_REPLACE_PROB = 0.8  # Google: rng.random() < 0.8 -> [MASK]
KEEP_ORIGINAL_PROB = 0.5  # Google: of the other 20%, half unchanged, half a random token


@dataclass(frozen=True)
class MaskingVocab:
    """Vocabulary facts the masking needs, computed once per tokenizer.

    Attributes:
        mask_token_id: id of [MASK].
        is_special: bool ``[V]``: tokens never masked (tokenizer special tokens except [UNK]).
        random_token_ids: int64 ``[R]``: pool for the 10% random replacement (no special tokens).
        is_continuation: bool ``[V]``: ``##`` pieces (for whole-word masking).
    """

    mask_token_id: int
    is_special: np.ndarray
    random_token_ids: np.ndarray
    is_continuation: np.ndarray

    @classmethod
    def from_tokenizer(cls, tokenizer) -> "MaskingVocab":
        """Build the tables from a BERT tokenizer (reads the whole vocabulary once)."""
        size = len(tokenizer)
        special = np.zeros(size, dtype=bool)
        never_masked = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        special[[i for i in never_masked if i < size]] = True
        random_pool = np.setdiff1d(np.arange(size, dtype=np.int64), np.asarray(tokenizer.all_special_ids))
        pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
        continuation = np.fromiter((bool(p) and p.startswith("##") for p in pieces), dtype=bool, count=size)
        return cls(int(tokenizer.mask_token_id), special, random_pool, continuation)


def num_to_predict(length: int, masked_lm_prob: float, max_predictions_per_seq: int) -> int:
    """Google's count: ``min(max_predictions_per_seq, max(1, round(length * masked_lm_prob)))``."""
    return min(max_predictions_per_seq, max(1, int(round(length * masked_lm_prob))))


def _word_groups(candidate: np.ndarray, continuation: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Candidate positions ``[C]`` and their word number ``[C]`` (0..W-1, in order)."""
    positions = np.flatnonzero(candidate)
    previous_candidate = np.zeros_like(candidate)
    previous_candidate[1:] = candidate[:-1]
    starts = candidate & ~(continuation & previous_candidate)
    return positions, np.cumsum(starts[positions]) - 1


def _choose_positions(
    candidate: np.ndarray,
    continuation: Optional[np.ndarray],
    budget: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Positions to predict (sorted), at most ``budget`` of them, whole words kept together."""
    if continuation is None:
        positions = np.flatnonzero(candidate)
        return np.sort(rng.permutation(positions)[:budget])
    positions, word = _word_groups(candidate, continuation)
    if positions.size == 0:
        return positions
    sizes = np.bincount(word)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    chosen, count = [], 0
    for w in rng.permutation(sizes.size):
        if count >= budget:
            break
        if count + sizes[w] > budget:
            continue
        chosen.append(positions[starts[w] : starts[w] + sizes[w]])
        count += int(sizes[w])
    return np.sort(np.concatenate(chosen)) if chosen else positions[:0]


def create_masked_lm_predictions(
    input_ids: Sequence[int] | np.ndarray,
    vocab: MaskingVocab,
    rng: np.random.Generator,
    *,
    masked_lm_prob: float,
    max_predictions_per_seq: int,
    whole_word_mask: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Mask one instance for MLM.

    Args:
        input_ids: token ids ``[L]`` (with [CLS]/[SEP]; [PAD] allowed and never masked).
        vocab: :class:`MaskingVocab` of the tokenizer.
        rng: numpy Generator; advanced by the call.
        masked_lm_prob: fraction of the sequence to predict (Google's ``masked_lm_prob``).
        max_predictions_per_seq: cap on predicted tokens.
        whole_word_mask: mask a word's ``##`` pieces together.

    Returns:
        ``(masked_ids, labels)``, both int64 ``[L]``: the ids with chosen positions replaced
        (80% [MASK] / 10% random / 10% unchanged), and the original ids at chosen positions
        with ``-100`` elsewhere.
    """
    ids = np.asarray(input_ids, dtype=np.int64)
    candidate = ~vocab.is_special[ids]
    continuation = vocab.is_continuation[ids] if whole_word_mask else None
    budget = num_to_predict(ids.size, masked_lm_prob, max_predictions_per_seq)
    chosen = _choose_positions(candidate, continuation, budget, rng)
    labels = np.full(ids.shape, IGNORE_INDEX, dtype=np.int64)
    labels[chosen] = ids[chosen]
    masked = ids.copy()
    replace = rng.random(chosen.size) < MASK_REPLACE_PROB
    masked[chosen[replace]] = vocab.mask_token_id
    others = chosen[~replace]
    randomised = others[rng.random(others.size) >= KEEP_ORIGINAL_PROB]
    if randomised.size:
        masked[randomised] = vocab.random_token_ids[rng.integers(vocab.random_token_ids.size, size=randomised.size)]
    return masked, labels


__all__ = ["IGNORE_INDEX", "MaskingVocab", "create_masked_lm_predictions", "num_to_predict"]

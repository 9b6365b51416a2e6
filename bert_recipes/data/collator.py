"""Batching of masked pretraining instances: padding only (masking happens in the stream)."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from .masking import IGNORE_INDEX


def padded_length(longest: int, pad_to_multiple_of: int, max_seq_length: Optional[int]) -> int:
    """``longest`` rounded up to a multiple of ``pad_to_multiple_of``, capped at ``max_seq_length``.

    The cap wins: with ``max_seq_length=130`` and multiple 8, a batch whose longest instance
    has 130 tokens is padded to 130 (not 136), so batches never exceed ``max_seq_length``.
    """
    length = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    if max_seq_length is not None:
        length = min(length, max(max_seq_length, longest))
    return length


class PretrainingCollator:
    """Pad a list of instances into a batch of ``torch.long`` tensors.

    Args:
        tokenizer: supplies ``pad_token_id`` (any object with that attribute).
        pad_to_multiple_of: pad the length to a multiple of this (tensor-core friendly).
        max_seq_length: never pad beyond this (see :func:`padded_length`).

    ``__call__(instances)`` takes dicts with ``input_ids``, ``token_type_ids``, ``labels``
    (lists of ints of equal length) and ``next_sentence_label`` (int) and returns
    ``input_ids`` (padded with the pad id), ``token_type_ids`` (0), ``attention_mask``
    (1 on tokens, 0 on padding), ``labels`` (-100 on padding): ``[B, L]``;
    ``next_sentence_label``: ``[B]``; and ``masked_lm_positions``: ``[M]``, the flat
    (row-major) indices into ``[B * L]`` of the M masked tokens (see :func:`masked_lm_positions`).

    Raises:
        ValueError: an empty list of instances.
    """

    def __init__(self, tokenizer, *, pad_to_multiple_of: int = 8, max_seq_length: Optional[int] = None):
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_seq_length = max_seq_length

    def __call__(self, instances: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not instances:
            raise ValueError("PretrainingCollator: empty batch")
        lengths = [len(x["input_ids"]) for x in instances]
        width = padded_length(max(lengths), self.pad_to_multiple_of, self.max_seq_length)
        shape = (len(instances), width)
        input_ids = np.full(shape, self.pad_token_id, dtype=np.int64)
        token_type_ids = np.zeros(shape, dtype=np.int64)
        attention_mask = np.zeros(shape, dtype=np.int64)
        labels = np.full(shape, IGNORE_INDEX, dtype=np.int64)
        for row, (instance, n) in enumerate(zip(instances, lengths)):
            input_ids[row, :n] = instance["input_ids"]
            token_type_ids[row, :n] = instance["token_type_ids"]
            attention_mask[row, :n] = 1
            labels[row, :n] = instance["labels"]
        nsp = np.fromiter((x["next_sentence_label"] for x in instances), dtype=np.int64, count=len(instances))
        return {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "next_sentence_label": torch.from_numpy(nsp),
            "masked_lm_positions": masked_lm_positions(labels),
        }


def masked_lm_positions(labels: np.ndarray) -> torch.Tensor:
    """The flat, row-major indices (``int64 [M]``) of the masked tokens of ``labels`` ``[B, L]``
    (entries other than -100), found on the host while collating.

    Google's ``masked_lm_positions`` (create_pretraining_data.py of google-research/bert), one
    list for the batch: the sparse MLM head gathers these positions instead of searching
    ``labels`` on the device, whose result size (M) would make the host wait for the device.
    """
    return torch.from_numpy(np.flatnonzero(labels.reshape(-1) != IGNORE_INDEX))


__all__ = ["PretrainingCollator", "masked_lm_positions", "padded_length"]

"""Padding into tensors: bert_recipes.data.collator."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from bert_recipes.data.collator import PretrainingCollator, padded_length

PAD = 7


def instance(n, nsp=0):
    ids = [2] + [10 + i for i in range(n - 2)] + [3]
    labels = [-100] * n
    labels[1] = 10
    return {"input_ids": ids, "token_type_ids": [0] * (n // 2) + [1] * (n - n // 2), "labels": labels,
            "next_sentence_label": nsp}


@pytest.mark.parametrize("longest, multiple, cap, expected", [
    (13, 8, 128, 16), (16, 8, 128, 16), (1, 8, 128, 8), (121, 8, 130, 128), (125, 8, 130, 128), (129, 8, 130, 130),
    (130, 8, 130, 130), (13, 1, None, 13), (100, 64, None, 128),
])
def test_padded_length(longest, multiple, cap, expected):
    assert padded_length(longest, multiple, cap) == expected


def test_collator_pads_to_a_multiple_of_8_with_the_right_values():
    collate = PretrainingCollator(SimpleNamespace(pad_token_id=PAD), pad_to_multiple_of=8, max_seq_length=128)
    batch = collate([instance(13, 1), instance(5, 0), instance(9, 1)])
    assert set(batch) == {"input_ids", "token_type_ids", "attention_mask", "labels", "next_sentence_label",
                          "masked_lm_positions"}
    assert all(t.dtype == torch.long for t in batch.values())
    assert batch["input_ids"].shape == (3, 16) and batch["next_sentence_label"].tolist() == [1, 0, 1]
    row = 1  # the 5-token instance
    assert batch["input_ids"][row].tolist() == [2, 10, 11, 12, 3] + [PAD] * 11
    assert batch["attention_mask"][row].tolist() == [1] * 5 + [0] * 11
    assert batch["token_type_ids"][row].tolist() == [0, 0, 1, 1, 1] + [0] * 11
    assert batch["labels"][row].tolist() == [-100, 10] + [-100] * 14
    assert (batch["attention_mask"].sum(1) == torch.tensor([13, 5, 9])).all()
    # the masked tokens' flat positions in [3 * 16], row-major: what the sparse MLM head gathers
    assert batch["masked_lm_positions"].tolist() == [0 * 16 + 1, 1 * 16 + 1, 2 * 16 + 1]  # column 1 of each row


def test_collator_never_exceeds_max_seq_length_when_it_is_not_a_multiple():
    collate = PretrainingCollator(SimpleNamespace(pad_token_id=0), pad_to_multiple_of=8, max_seq_length=130)
    assert collate([instance(130), instance(20)])["input_ids"].shape == (2, 130)
    assert collate([instance(121)])["input_ids"].shape == (1, 128)


def test_collator_rejects_an_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        PretrainingCollator(SimpleNamespace(pad_token_id=0))([])

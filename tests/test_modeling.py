"""The pretraining objective: sparse MLM head == stock BertForPreTraining, gradient
accumulation == one large batch, and the FLOPs formula against a hand computation."""

from __future__ import annotations

import pytest
import torch
from transformers import BertConfig, BertForPreTraining

from bert_recipes.modeling import BertPreTrainingObjective, training_flops_per_token


def tiny_model(seed: int = 0) -> BertForPreTraining:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        attn_implementation="sdpa",
    )
    return BertForPreTraining(config).eval()


def make_batch(batch: int, length: int, masked_per_row: list[int], seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, 300, (batch, length), generator=g)
    attention_mask = torch.ones(batch, length, dtype=torch.long)
    attention_mask[0, length - 3:] = 0  # some padding
    input_ids[attention_mask == 0] = 0
    token_type_ids = torch.zeros(batch, length, dtype=torch.long)
    token_type_ids[:, length // 2:] = 1
    labels = torch.full((batch, length), -100)
    for row, count in enumerate(masked_per_row):
        positions = torch.randperm(length - 4, generator=g)[:count] + 1
        labels[row, positions] = torch.randint(5, 300, (count,), generator=g)
    return {
        "input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask,
        "labels": labels, "next_sentence_label": torch.randint(0, 2, (batch,), generator=g),
    }


def test_sparse_head_matches_stock_forward_and_gradients():
    batch = make_batch(4, 24, [1, 3, 5, 2], seed=1)
    stock = tiny_model()
    ours = BertPreTrainingObjective(tiny_model(), sparse_mlm_head=True)

    ref = stock(**batch)
    stock_loss = ref.loss  # mean MLM CE over masked tokens + mean NSP CE
    stock_loss.backward()

    out = ours(**batch)
    loss = out["mlm_loss_sum"] / out["num_masked"] + out["nsp_loss_sum"] / out["num_sequences"]
    loss.backward()

    assert int(out["num_masked"]) == 11
    assert abs(loss.item() - stock_loss.item()) < 1e-5
    stock_grads = dict(stock.named_parameters())
    for name, param in ours.model.named_parameters():
        torch.testing.assert_close(param.grad, stock_grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)


def test_dense_and_sparse_heads_agree():
    batch = make_batch(3, 16, [2, 2, 4], seed=2)
    model = tiny_model()
    sparse = BertPreTrainingObjective(model, sparse_mlm_head=True)(**batch)
    dense = BertPreTrainingObjective(model, sparse_mlm_head=False)(**batch)
    for key in sparse:
        torch.testing.assert_close(sparse[key].float(), dense[key].float(), atol=1e-5, rtol=1e-5)


def test_objective_keeps_the_stock_state_dict():
    model = tiny_model()
    objective = BertPreTrainingObjective(model)
    assert list(objective.model.state_dict()) == list(BertForPreTraining(model.config).state_dict())
    assert sum(p.numel() for p in objective.parameters()) == sum(p.numel() for p in model.parameters())


def test_gradient_accumulation_equals_one_large_batch():
    """Two micro-batches with different masked counts (1+1 vs 6+6 tokens) accumulate to the
    gradient of the concatenated batch: the MLM loss is normalised over all masked tokens
    of the window, not averaged per micro-batch."""
    from .conftest import fp32_accelerator

    from bert_recipes.pretrain_job import PretrainJob
    from bert_recipes.training.loop import forward_backward

    accelerator = fp32_accelerator()
    job = PretrainJob(None, iter(()), accelerator.device, total_steps=1, config=None)
    first, second = make_batch(2, 20, [1, 1], seed=3), make_batch(2, 20, [6, 6], seed=4)
    big = {key: torch.cat([first[key], second[key]]) for key in first}

    accumulated = BertPreTrainingObjective(tiny_model())
    sums, _ = forward_backward(accelerator, accumulated, job, [first, second])
    reference = BertPreTrainingObjective(tiny_model())
    out = reference(**big)
    (out["mlm_loss_sum"] / out["num_masked"] + out["nsp_loss_sum"] / out["num_sequences"]).backward()

    assert sums["num_masked"] == 14 and sums["num_sequences"] == 4  # masked tokens and sequences of the window
    ref_grads = dict(reference.named_parameters())
    for name, param in accumulated.named_parameters():
        torch.testing.assert_close(param.grad, ref_grads[name].grad, atol=1e-6, rtol=1e-5, msg=name)

    # The naive mean of micro-batch means gives a different gradient: the test is sensitive.
    naive = BertPreTrainingObjective(tiny_model())
    for micro in (first, second):
        o = naive(**micro)
        ((o["mlm_loss_sum"] / o["num_masked"] + o["nsp_loss_sum"] / o["num_sequences"]) / 2).backward()
    diff = max((p.grad - ref_grads[n].grad).abs().max().item() for n, p in naive.named_parameters())
    assert diff > 1e-4


def test_flops_per_token_bert_base_by_hand():
    config = BertConfig()  # bert-base: h=768, i=3072, n=12, V=30522
    # per layer: 4*768^2 + 2*768*3072 = 2,359,296 + 4,718,592 = 7,077,888; x12 layers x2 = 169,869,312
    # attention at s=128: 2*12*2*128*768 = 4,718,592
    # MLM head on every position: 2*(768^2 + 768*30522) = 48,061,440
    # forward = 222,649,344; training = 3x = 667,948,032
    assert training_flops_per_token(config, seq_len=128) == pytest.approx(667_948_032)
    # sparse head at 15% of positions: head 7,209,216 -> forward 181,797,120 -> x3
    assert training_flops_per_token(config, seq_len=128, predictions_per_token=0.15) == pytest.approx(545_391_360)

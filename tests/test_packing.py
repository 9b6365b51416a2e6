"""Padding-free (packed) batches: bert_recipes.data.packing and the packed forward of
bert_recipes.modeling.encode, against the unpacked path on the same instances."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from bert_recipes.data.collator import PretrainingCollator
from bert_recipes.data.packing import PackedCollator, first_fit_decreasing, packing_efficiency
from bert_recipes.modeling import BertPreTrainingObjective, register_varlen_attention

PAD, CLS, SEP, MASK = 0, 2, 3, 4
MAX_LEN = 64


VARLEN_CALLS: list[int] = []  # segments per call of varlen_reference


def varlen_reference(module, query, key, value, attention_mask, dropout=0.0, scaling=None, cu_seq_lens_q=None,
                     cu_seq_lens_k=None, max_length_q=None, max_length_k=None, **_):
    """flash-attn's variable-length contract on the CPU, for the tests: one flattened sequence
    ``[1, heads, T, d]``, no mask, SDPA over each ``cu_seq_lens`` segment on its own."""
    VARLEN_CALLS.append(cu_seq_lens_q.numel() - 1)
    assert attention_mask is None and query.shape[0] == 1 and torch.equal(cu_seq_lens_q, cu_seq_lens_k)
    assert cu_seq_lens_q.dtype == torch.int32 and int(cu_seq_lens_q[-1]) == query.shape[2]
    bounds = cu_seq_lens_q.tolist()
    assert max(b - a for a, b in zip(bounds, bounds[1:])) <= max_length_q == max_length_k
    out = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], dropout_p=dropout, scale=scaling)
        for a, b in zip(bounds, bounds[1:])], dim=2)
    return out.transpose(1, 2).contiguous(), None


register_varlen_attention("varlen_reference", varlen_reference)


class Tok:
    pad_token_id = PAD


def instance(length: int, rng: random.Random, nsp: int = 0) -> dict:
    """``[CLS] A [SEP] B [SEP]`` of ``length`` tokens with ~15% labelled positions."""
    a = max(1, (length - 3) // 2)
    b = length - 3 - a
    ids = [CLS] + [rng.randint(10, 99) for _ in range(a)] + [SEP] + [rng.randint(10, 99) for _ in range(b)] + [SEP]
    types = [0] * (a + 2) + [1] * (b + 1)
    labels = [-100] * length
    for pos in rng.sample([p for p in range(length) if ids[p] not in (CLS, SEP)], max(1, round(0.15 * length))):
        labels[pos] = ids[pos]
        ids[pos] = MASK
    return {"input_ids": ids, "token_type_ids": types, "labels": labels, "next_sentence_label": nsp}


def batch_of(lengths, seed=0):
    rng = random.Random(seed)
    return [instance(n, rng, nsp=i % 2) for i, n in enumerate(lengths)]


def model(attn="sdpa", dropout=0.0, seed=0):
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=MAX_LEN, hidden_dropout_prob=dropout,
                        attention_probs_dropout_prob=dropout, attn_implementation=attn)
    return BertForPreTraining(config)


def test_first_fit_decreasing_places_every_item_once_within_capacity():
    rng = random.Random(1)
    lengths = [rng.randint(5, 64) for _ in range(200)]
    rows = first_fit_decreasing(lengths, 64)
    assert sorted(i for row in rows for i in row) == list(range(200))
    assert all(sum(lengths[i] for i in row) <= 64 for row in rows)
    assert len(rows) <= -(-sum(lengths) // 64) * 11 // 9 + 1  # FFD: within 11/9 OPT + 1
    with pytest.raises(ValueError):
        first_fit_decreasing([65], 64)


def test_packed_rows_restart_positions_and_point_at_each_cls():
    items = batch_of([64, 5, 30, 20, 12, 40])
    packed = PackedCollator(Tok(), max_seq_length=MAX_LEN)(items)
    assert packed["input_ids"].shape == (3, 64)  # 64 | 40+20 | 30+12+5
    flat = {key: packed[key].flatten() for key in ("input_ids", "labels", "token_type_ids", "position_ids")}
    for i, item in enumerate(items):
        start = int(packed["cls_index"][i])
        n = len(item["input_ids"])
        assert flat["input_ids"][start : start + n].tolist() == item["input_ids"]
        assert flat["labels"][start : start + n].tolist() == item["labels"]
        assert flat["token_type_ids"][start : start + n].tolist() == item["token_type_ids"]
        assert flat["position_ids"][start : start + n].tolist() == list(range(n))
        assert len(set(packed["segment_ids"].flatten()[start : start + n].tolist())) == 1
    assert packed["next_sentence_label"].tolist() == [x["next_sentence_label"] for x in items]
    assert packing_efficiency(packed) == pytest.approx(171 / 192)
    assert (packed["labels"][packed["attention_mask"] == 0] == -100).all()
    # the masked tokens' flat positions: every labelled token of every instance, row-major
    expected = sorted(int(packed["cls_index"][i]) + j for i, item in enumerate(items)
                      for j, label in enumerate(item["labels"]) if label != -100)
    assert packed["masked_lm_positions"].tolist() == expected and expected


def test_cu_seq_lens_mark_every_instance_and_padding_tail():
    packed = PackedCollator(Tok(), max_seq_length=MAX_LEN)(batch_of([64, 5, 30, 20, 12, 40]))
    # rows: [64] | [40, 20, pad 4] | [30, 12, 5, pad 17]
    assert packed["cu_seq_lens"].dtype == torch.int32
    assert packed["cu_seq_lens"].tolist() == [0, 64, 104, 124, 128, 158, 170, 175, 192]
    one_row = PackedCollator(Tok(), max_seq_length=MAX_LEN)(batch_of([64]))
    assert one_row["cu_seq_lens"].tolist() == [0, 64]


@pytest.mark.parametrize("attn", ["sdpa", "eager", "varlen_reference"])
def test_packed_losses_and_gradients_equal_unpacked(attn):
    items = batch_of([64, 5, 33, 17, 61, 9, 25, 40])  # one at full length, one of 5 tokens
    unpacked = PretrainingCollator(Tok(), max_seq_length=MAX_LEN)(items)
    packed = PackedCollator(Tok(), max_seq_length=MAX_LEN)(items)
    assert packed["input_ids"].shape[0] < unpacked["input_ids"].shape[0]
    VARLEN_CALLS.clear()
    results = []
    for batch, implementation in ((unpacked, "sdpa" if attn == "varlen_reference" else attn), (packed, attn)):
        objective = BertPreTrainingObjective(model(implementation))
        out = objective(**batch)
        (out["mlm_loss_sum"] / out["num_masked"] + out["nsp_loss_sum"] / out["num_sequences"]).backward()
        grads = {name: p.grad.clone() for name, p in objective.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (a, grads_a), (b, grads_b) = results
    if attn == "varlen_reference":  # the kernel ran, once per layer, on the flattened rows
        assert VARLEN_CALLS[-2:] == [len(packed["cu_seq_lens"]) - 1] * 2
    for key in ("mlm_loss_sum", "nsp_loss_sum"):  # the MLM and NSP parts separately
        assert float(a[key]) == pytest.approx(float(b[key]), abs=1e-5)
    for key in ("num_masked", "num_sequences", "mlm_correct", "nsp_correct"):
        assert int(a[key]) == int(b[key])
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("attn,train", [("sdpa", False), ("varlen_reference", False), ("sdpa_dropout", True)])
def test_attention_never_crosses_instances(attn, train):
    """Also while training on bert_recipes' sdpa_dropout (attention and hidden dropout 0.1,
    the same random draws in both forwards)."""
    from bert_recipes.attention import runtime_attention
    from bert_recipes.modeling import encode

    items = batch_of([64, 20, 20, 24])
    m = model(runtime_attention("sdpa"), dropout=0.1).train() if train else model(attn).eval()
    packed = PackedCollator(Tok(), max_seq_length=MAX_LEN)(items)
    assert packed["input_ids"].shape[0] == 2  # [64] and [24, 20, 20]
    changed = [dict(x) for x in items]
    changed[2]["input_ids"] = [CLS] + [int(t) % 80 + 11 for t in changed[2]["input_ids"][1:-1]] + [SEP]
    other = PackedCollator(Tok(), max_seq_length=MAX_LEN)(changed)
    with torch.no_grad():
        torch.manual_seed(0)
        h1, p1 = encode(m, **{k: packed[k] for k in ("input_ids", "token_type_ids", "attention_mask", "position_ids",
                                                     "segment_ids", "cls_index")})
        torch.manual_seed(0)
        h2, p2 = encode(m, **{k: other[k] for k in ("input_ids", "token_type_ids", "attention_mask", "position_ids",
                                                    "segment_ids", "cls_index")})
    row, column = divmod(int(packed["cls_index"][2]), MAX_LEN)
    assert row == 1 and {int(i) // MAX_LEN for i in packed["cls_index"][1:]} == {1}  # shares a row with 1 and 3
    mine = packed["segment_ids"][1] == packed["segment_ids"][1, column]
    assert not torch.allclose(h1[1][mine], h2[1][mine])  # the perturbed instance changed
    torch.testing.assert_close(h1[1][~mine], h2[1][~mine], rtol=0, atol=1e-6)  # its row neighbours did not
    torch.testing.assert_close(h1[0], h2[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(p1[[0, 1, 3]], p2[[0, 1, 3]], rtol=0, atol=1e-6)


def test_packed_forward_in_bf16_stays_finite():
    items = batch_of([64, 5, 7, 33, 12])
    packed = PackedCollator(Tok(), max_seq_length=MAX_LEN)(items)
    objective = BertPreTrainingObjective(model())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = objective(**packed)
    assert np.isfinite(float(out["mlm_loss_sum"])) and np.isfinite(float(out["nsp_loss_sum"]))


# ----------------------------------------------------------------------------- in the stream


def test_stream_packs_rows_and_resumes_exactly(tmp_path):
    import io

    from bert_recipes.data import build_pretraining_dataloader
    from bert_recipes.data.packing import pack_rows
    from bert_recipes.recipe import DataConfig
    from tests.data_fixtures import make_doc, make_vocab_tokenizer, write_blank_line_corpus

    tok = make_vocab_tokenizer()
    rng = random.Random(4)
    files = [str(write_blank_line_corpus(tmp_path / f"{f}.txt", [make_doc(f * 6 + k, rng.randint(1, 8), 6, rng)
                                                                for k in range(6)])) for f in range(3)]
    c = DataConfig(train_files=files, max_seq_length=64, max_predictions_per_seq=10, shuffle_buffer_size=8,
                   packing=True, packing_window=16)
    plain = list(pack_rows(iter(range(0)), {"window": [], "ready": []}, 64, 16, np.random.default_rng(0)))
    assert plain == []

    def loader(workers):
        return build_pretraining_dataloader(c, tok, files, batch_size=3, seed=2, num_workers=workers)

    for workers in (0, 2):
        reference = []
        for k, batch in enumerate(loader(workers)):
            reference.append(batch)
            if k == 40:
                break
        assert all(b["input_ids"].shape[1] <= 64 and b["input_ids"].shape[0] <= 3 for b in reference)
        assert sum(int(b["attention_mask"].sum()) for b in reference) / sum(b["attention_mask"].numel()
                                                                              for b in reference) > 0.85
        assert any(len(b["next_sentence_label"]) > 3 for b in reference)  # several instances per row
        interrupted = loader(workers)
        iterator = iter(interrupted)
        for _ in range(13):
            next(iterator)
        buffer = io.BytesIO()
        torch.save(interrupted.state_dict(), buffer)
        buffer.seek(0)
        resumed = loader(workers)
        resumed.load_state_dict(torch.load(buffer, weights_only=True))
        for expected, got in zip(reference[13:], resumed):
            assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_batch_packing_keeps_each_batch_s_instances(tmp_path):
    """``data.packing: batch``: the same instances per step as unpacked, in fewer rows."""
    from bert_recipes.data import build_pretraining_dataloader
    from bert_recipes.inspect_batches import batch_examples
    from bert_recipes.recipe import DataConfig
    from tests.data_fixtures import make_doc, make_vocab_tokenizer, write_blank_line_corpus

    tok = make_vocab_tokenizer()
    rng = random.Random(6)
    files = [str(write_blank_line_corpus(tmp_path / f"{f}.txt", [make_doc(f * 6 + k, rng.randint(1, 8), 6, rng)
                                                                for k in range(6)])) for f in range(3)]
    batches = {}
    for packing in (False, "batch"):
        c = DataConfig(train_files=files, max_seq_length=64, max_predictions_per_seq=10, shuffle_buffer_size=8,
                       packing=packing)
        loader = build_pretraining_dataloader(c, tok, files, batch_size=8, seed=3, num_workers=0)
        batches[packing] = [batch for _, batch in zip(range(12), loader)]
    fewer_rows = 0
    for plain, packed in zip(batches[False], batches["batch"]):
        assert packed["input_ids"].shape[1] == 64 and len(packed["next_sentence_label"]) == 8
        fewer_rows += packed["input_ids"].shape[0] < 8
        unpadded = [{key: [v for v, m in zip(example[key], example["attention_mask"]) if m] for key in
                     ("input_ids", "token_type_ids", "labels")} | {"nsp": example["next_sentence_label"]}
                    for example in batch_examples(plain)]
        mine = [{key: example[key] for key in ("input_ids", "token_type_ids", "labels")}
                | {"nsp": example["next_sentence_label"]} for example in batch_examples(packed)]
        assert mine == unpadded  # the same instances, in the same order
    assert fewer_rows >= 6


@pytest.mark.slow
def test_packed_run_exports_the_same_format(tmp_path):
    from safetensors.torch import load_file

    from bert_recipes.cli import main
    from tests.conftest import TINY_RECIPE, tiny_overrides

    shapes = []
    for packing in ("false", "true", "batch"):
        out = tmp_path / packing
        assert main(["pretrain", str(TINY_RECIPE), *tiny_overrides(out, **{"data.packing": packing})]) == 0
        weights = load_file(out / "final" / "model.safetensors")
        shapes.append({k: (tuple(v.shape), v.dtype) for k, v in weights.items()})
        assert sorted(p.name for p in (out / "final").iterdir()) == sorted(
            p.name for p in (tmp_path / "false" / "final").iterdir())
    assert shapes[0] == shapes[1]


# ----------------------------------------------------------------------------- fine-tuning


@pytest.mark.parametrize("regression,attn", [(False, "sdpa"), (True, "sdpa"), (False, "varlen_reference")])
def test_packed_classification_equals_padded(regression, attn):
    from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

    from bert_recipes.data.packing import PackedFeatureCollator
    from bert_recipes.modeling import classification_logits

    class FastTok:  # what DataCollatorWithPadding needs
        pad_token_id, padding_side, model_input_names = PAD, "right", ["input_ids", "token_type_ids", "attention_mask"]

        def pad(self, features, **kw):
            from transformers import BertTokenizerFast
            raise NotImplementedError

    rng = random.Random(5)
    features = []
    for n in (7, 30, 12, 64, 9, 25):
        ids = [CLS] + [rng.randint(10, 99) for _ in range(n - 2)] + [SEP]
        features.append({"input_ids": ids, "token_type_ids": [0] * n, "attention_mask": [1] * n,
                         "labels": rng.random() * 5 if regression else rng.randint(0, 2)})
    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        max_position_embeddings=MAX_LEN, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=1 if regression else 3)
    model = BertForSequenceClassification(config)
    packed = PackedFeatureCollator(Tok(), max_seq_length=MAX_LEN)(features)
    assert packed["input_ids"].shape[0] < len(features) and packed["labels"].shape == (6,)
    width = max(len(f["input_ids"]) for f in features)
    padded = {key: torch.tensor([f[key] + [0] * (width - len(f[key])) for f in features])
              for key in ("input_ids", "token_type_ids", "attention_mask")}
    padded["labels"] = torch.tensor([f["labels"] for f in features])
    grads = []
    for batch, implementation in ((padded, "sdpa"), (packed, attn)):
        model.set_attn_implementation(implementation)
        logits = classification_logits(model, batch)
        assert logits.shape == (6, config.num_labels)
        loss = (logits.squeeze(-1) - batch["labels"]).pow(2).mean() if regression else \
            torch.nn.functional.cross_entropy(logits, batch["labels"])
        model.zero_grad()
        loss.backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=0, atol=1e-5)
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("saved, resumed", [(True, "batch"), ("batch", True), (False, True)])
def test_resume_refuses_a_change_between_stream_rows_and_instances(tmp_path, saved, resumed):
    """A ``data.packing: true`` state holds the packer's window of instances; resuming it as
    instances (or the reverse) would drop them or change what a batch is: a one-line error.
    ``false`` <-> ``batch`` keeps the same instances in the same batches, so it is allowed."""
    from bert_recipes.data import PretrainingStream
    from bert_recipes.errors import DataError
    from bert_recipes.recipe import DataConfig
    from tests.data_fixtures import make_doc, make_vocab_tokenizer, write_blank_line_corpus

    tok = make_vocab_tokenizer()
    rng = random.Random(4)
    files = [str(write_blank_line_corpus(tmp_path / "a.txt", [make_doc(k, rng.randint(2, 8), 6, rng) for k in range(8)]))]

    def stream(packing):
        return PretrainingStream(DataConfig(train_files=files, max_seq_length=64, max_predictions_per_seq=10,
                                            packing=packing, packing_window=8), tok, files, seed=0)

    first = stream(saved)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    with pytest.raises(DataError, match=r"^data.packing: the saved data state was written with data.packing "):
        stream(resumed).load_state_dict(state)
    other = stream("batch" if saved is False else False) if saved is not True else None
    if other is not None:  # false <-> batch: same stream, resumes
        other.load_state_dict(state)
        next(iter(other))

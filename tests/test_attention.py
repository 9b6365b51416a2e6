"""The ``sdpa_dropout`` attention (bert_recipes/attention.py): the function it computes, its
gradients, its dropout rate, and that a BERT on it is transformers' SDPA BERT."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bert_recipes import attention
from bert_recipes.attention import NAME, DropoutAttention, runtime_attention
from bert_recipes.dropout import drop_mask


def qkv(shape=(2, 3, 16, 8), dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype, requires_grad=True) for _ in range(3)]


def masks(batch=2, length=16):
    gen = torch.Generator().manual_seed(1)
    boolean = torch.rand(batch, 1, length, length, generator=gen) > 0.3
    boolean[..., 0] = True  # no query row masked everywhere
    additive = torch.zeros(batch, 1, 1, length, dtype=torch.float64)
    additive[1, ..., length * 5 // 8:] = torch.finfo(torch.float64).min  # a padded second sequence
    return [None, boolean, additive]


@pytest.fixture(params=[2, 3, 1 << 20], ids=["heads-2-at-a-time", "one-row-at-a-time", "one-block"])
def block(request, monkeypatch):
    """Score matrices per block (3 heads per batch row): BLOCK_ELEMENTS for a length."""
    def set_length(length: int) -> None:
        monkeypatch.setattr(attention, "BLOCK_ELEMENTS", request.param * length * length)

    set_length(16)
    return set_length


@pytest.mark.parametrize("mask_index", [0, 1, 2], ids=["no-mask", "bool", "additive"])
def test_forward_is_dropout_of_softmax_attention_with_the_drawn_mask(block, mask_index):
    q, k, v = qkv()
    mask = masks()[mask_index]
    torch.manual_seed(0)
    out = DropoutAttention.apply(q, k, v, mask, 0.25, 8**-0.5)
    torch.manual_seed(0)
    drop = drop_mask((6, 16, 16), 0.25, "cpu").view(2, 3, 16, 16)  # the call's first and only draw
    scores = q @ k.transpose(-1, -2) * 8**-0.5
    if mask is not None and mask.dtype == torch.bool:
        scores = scores.masked_fill(~mask, float("-inf"))
    elif mask is not None:
        scores = scores + mask
    expected = (scores.softmax(-1).masked_fill(drop, 0) / 0.75) @ v
    assert 0.2 < drop.double().mean() < 0.3
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mask_index", [0, 1, 2], ids=["no-mask", "bool", "additive"])
def test_gradients_match_finite_differences(block, mask_index):
    block(8)  # a shorter sequence: gradcheck's cost grows with the input size
    q, k, v = qkv((2, 3, 8, 4))
    mask = masks(length=8)[mask_index]

    def f(q, k, v):
        torch.manual_seed(0)  # the same dropout mask at every evaluation
        return DropoutAttention.apply(q, k, v, mask, 0.2, 4**-0.5)

    assert torch.autograd.gradcheck(f, (q, k, v))


def test_without_dropout_it_is_sdpa():
    q, k, v = qkv()
    mask = masks()[1]
    out = DropoutAttention.apply(q, k, v, mask, 0.0, 8**-0.5)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), rtol=1e-12, atol=1e-12)


def tiny_bert(attn: str, dropout: float = 0.1):
    from transformers import BertConfig, BertForPreTraining

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=dropout,
                        attn_implementation=attn)
    return BertForPreTraining(config)


def padded_batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 100, (2, 12), generator=gen)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0
    return ids, mask


def test_bert_on_sdpa_dropout_evaluates_exactly_as_sdpa():
    ids, mask = padded_batch()
    ours, stock = tiny_bert(runtime_attention("sdpa")).eval(), tiny_bert("sdpa").eval()
    assert ours.config._attn_implementation == NAME
    with torch.no_grad():
        a = ours(input_ids=ids, attention_mask=mask).prediction_logits
        b = stock(input_ids=ids, attention_mask=mask).prediction_logits
    assert torch.equal(a, b)


def test_bert_trains_on_it_without_attending_to_padding():
    """In training (attention dropout on), a padded sequence's real tokens never see its
    padding: changing a padding token changes none of their outputs; and without dropout,
    a training step's gradients are SDPA's."""
    ids, mask = padded_batch()
    model = tiny_bert(runtime_attention("sdpa")).train()
    torch.manual_seed(5)
    a = model(input_ids=ids, attention_mask=mask).prediction_logits
    changed = ids.clone()
    changed[1, 9] = 42
    torch.manual_seed(5)
    b = model(input_ids=changed, attention_mask=mask).prediction_logits
    torch.testing.assert_close(a[1, :7], b[1, :7], rtol=0, atol=0)
    assert not torch.equal(a[1, 9], b[1, 9])

    grads = []
    for attn in (runtime_attention("sdpa"), "sdpa"):
        net = tiny_bert(attn, dropout=1e-12).train()  # dropout "on" (our path) but keeping every value
        net(input_ids=ids, attention_mask=mask).prediction_logits.sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_bf16_training_step_stays_close_and_finite():
    ids, mask = padded_batch()
    losses = {}
    for attn in (runtime_attention("sdpa"), "sdpa"):
        model = tiny_bert(attn, dropout=1e-12).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(input_ids=ids, attention_mask=mask).prediction_logits.float()
        loss = F.cross_entropy(out.flatten(0, 1), ids.flatten())
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        losses[attn] = loss.item()
    assert losses[NAME] == pytest.approx(losses["sdpa"], rel=1e-2)


def test_runtime_attention_and_exports(tmp_path):
    assert runtime_attention("sdpa") == NAME
    for other in ("eager", "flash_attention_2"):
        assert runtime_attention(other) == other
    tiny_bert(runtime_attention("sdpa")).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert NAME not in json.dumps(config)  # a checkpoint records no attention implementation


def test_what_sdpa_dropout_hands_back_to_sdpa():
    """Causal attention without a mask (SDPA's is_causal), grouped key/value heads, a
    position bias, a mask that needs a gradient, empty inputs, evaluation, dropout 0 in
    float32, in evaluation mode or past 512 keys: transformers' SDPA. Dropout 0 in bf16 in
    training mode stays on the blocked kernel (SDPA's bf16 backward is slow on a CPU), with or
    without a gradient (a reentrant checkpoint's first forward has none)."""
    from bert_recipes.attention import BF16_NO_DROPOUT_MAX_LENGTH, runs_blocked

    class Module(torch.nn.Module):
        is_causal = False

    q = k = torch.randn(2, 2, 4, 8)
    bidirectional, causal = Module(), Module()
    causal.is_causal = True
    assert runs_blocked(bidirectional, q, k, k, None, 0.1, {})
    assert not runs_blocked(bidirectional, q, k, k, None, 0.0, {})
    assert not runs_blocked(causal, q, k, k, None, 0.1, {})
    assert runs_blocked(causal, q, k, k, torch.ones(2, 1, 4, 4, dtype=torch.bool), 0.1, {})  # the mask says it all
    assert not runs_blocked(bidirectional, q, k, k, None, 0.1, {"position_bias": torch.zeros(1)})
    assert not runs_blocked(bidirectional, q, k, k, torch.zeros(2, 1, 4, 4, requires_grad=True), 0.1, {})
    assert not runs_blocked(bidirectional, q[:0], k[:0], k[:0], None, 0.1, {})

    bf16 = q.bfloat16()
    assert runs_blocked(bidirectional, bf16, bf16, bf16, None, 0.0, {})  # bf16, training mode
    with torch.no_grad():
        assert runs_blocked(bidirectional, bf16, bf16, bf16, None, 0.0, {})
    assert not runs_blocked(bidirectional, q, k, k, None, 0.0, {})  # float32
    assert not runs_blocked(bidirectional.eval(), bf16, bf16, bf16, None, 0.0, {})  # evaluation
    bidirectional.train()
    assert BF16_NO_DROPOUT_MAX_LENGTH == 512
    long_k = torch.zeros(2, 2, 513, 8, dtype=torch.bfloat16)
    assert runs_blocked(bidirectional, bf16, long_k[:, :, :512], long_k[:, :, :512], None, 0.0, {})
    assert not runs_blocked(bidirectional, bf16, long_k, long_k, None, 0.0, {})  # past 512 keys: SDPA
    assert runs_blocked(bidirectional, bf16, long_k, long_k, None, 0.1, {})  # dropout: blocked at any length

    seen = []
    torch.func.grad(lambda x: seen.append(runs_blocked(bidirectional, x, k, k, None, 0.1, {})) or x.sum())(q)
    assert seen == [False]  # inside a torch.func transform: SDPA (no setup_context here)


def test_without_dropout_it_draws_nothing_and_its_gradients_are_sdpas():
    """At p = 0 no mask is drawn (the generator does not move) and forward and gradients
    are SDPA's, with every kind of mask."""
    for mask in masks():
        q, k, v = qkv()
        state = torch.get_rng_state()
        out = DropoutAttention.apply(q, k, v, mask, 0.0, 8**-0.5)
        assert torch.equal(torch.get_rng_state(), state)
        grad = torch.randn_like(out)
        ours = torch.autograd.grad(out, (q, k, v), grad)
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
        for a, b in zip(ours, torch.autograd.grad(expected, (q, k, v), grad)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_a_bf16_bert_without_dropout_evaluates_alike_with_or_without_a_gradient():
    """Evaluation mode runs SDPA whatever the gradient mode, so the values do not depend on it."""
    ids, mask = padded_batch()
    model = tiny_bert(runtime_attention("sdpa"), dropout=0.0).to(torch.bfloat16).eval()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask).prediction_logits
    with torch.enable_grad():
        b = model(input_ids=ids, attention_mask=mask).prediction_logits
    assert torch.equal(a, b)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_torch_func_grad_through_a_bert_on_it_is_sdpas(dropout):
    """``torch.func.grad`` over a model on ``sdpa_dropout`` (bf16; with and without attention
    dropout) runs, and equals the same transform over transformers' SDPA model."""
    from torch.func import functional_call, grad

    ids, mask = padded_batch()
    grads = []
    for attn in (runtime_attention("sdpa"), "sdpa"):
        model = tiny_bert(attn, dropout=dropout).to(torch.bfloat16).train()
        params = {name: p.detach() for name, p in model.named_parameters()}

        def loss(params):
            out = functional_call(model, params, (ids,), {"attention_mask": mask})
            return out.prediction_logits.float().logsumexp(-1).mean()

        torch.manual_seed(0)  # the same dropout draws for both
        grads.append(grad(loss)(params))
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


def test_a_bf16_bert_without_dropout_trains_on_the_blocked_kernel(monkeypatch):
    """BERT with attention dropout 0, in bf16, training: the blocked kernel runs (counted),
    and its loss and gradients match transformers' SDPA within bf16's rounding."""
    calls = []
    original = DropoutAttention.apply
    monkeypatch.setattr(DropoutAttention, "apply", lambda *a: calls.append(a[4]) or original(*a))
    ids, mask = padded_batch()
    grads = {}
    for attn in (runtime_attention("sdpa"), "sdpa"):
        model = tiny_bert(attn, dropout=0.0).to(torch.bfloat16).train()
        out = model(input_ids=ids, attention_mask=mask).prediction_logits.float()
        loss = out.logsumexp(-1).mean()
        loss.backward()
        grads[attn] = (loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None})
    assert calls == [0.0, 0.0]  # two layers, blocked, no dropout; stock SDPA BERT never calls it
    (loss_a, a), (loss_b, b) = grads.values()
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-2, atol=1e-2)
    for name in a:  # relative error of each gradient: 0.5% at most here (a grad_v 20% off: 20%)
        if "key.bias" not in name:  # mathematically zero (softmax ignores a per-row constant)
            assert (a[name] - b[name]).norm() <= 0.01 * b[name].norm(), name


def test_a_causal_bert_keeps_its_causal_mask_while_training():
    from transformers import BertConfig, BertLMHeadModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, is_decoder=True, hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=1e-12, attn_implementation=runtime_attention("sdpa"))
    model = BertLMHeadModel(config).train()
    ids = torch.randint(5, 100, (1, 8))
    changed = ids.clone()
    changed[0, -1] = (int(ids[0, -1]) + 1) % 100
    first = [model(input_ids=x, use_cache=False).logits[0, 0] for x in (ids, changed)]
    assert torch.equal(first[0], first[1])  # the first position never sees the last token


def test_a_float32_additive_mask_in_bf16_stays_finite():
    """finfo(float32).min cast to bf16 is -inf; a query row masked everywhere would give NaN."""
    q, k, v = (t.detach().to(torch.bfloat16) for t in qkv((1, 2, 4, 8), dtype=torch.float32))
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1, :] = torch.finfo(torch.float32).min  # query row 1 sees nothing
    torch.manual_seed(0)
    out = DropoutAttention.apply(q, k, v, mask, 0.1, 8**-0.5)
    assert torch.isfinite(out).all()
    assert mask.min() == torch.finfo(torch.float32).min  # the caller's mask is not modified


@pytest.fixture
def cudnn_sdp_restored():
    before = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield
    torch.backends.cuda.enable_cudnn_sdp(before)


@pytest.mark.parametrize("packing", [True, "batch"])
def test_packed_batches_on_cuda_turn_cudnn_attention_off(cudnn_sdp_restored, packing):
    line = attention.kernels_for_packed_batches("cuda", packing)
    assert "cuDNN" in line and "per shape" in line
    assert torch.backends.cuda.cudnn_sdp_enabled() is False
    assert attention.kernels_for_packed_batches("cuda", packing) == line  # already off: logged again (a sweep's next run)
    assert torch.backends.cuda.cudnn_sdp_enabled() is False


@pytest.mark.parametrize("device_type, packing", [("cpu", "batch"), ("cpu", True), ("cuda", False), ("mps", True)])
def test_cudnn_attention_stays_without_packing_or_off_cuda(cudnn_sdp_restored, device_type, packing):
    assert attention.kernels_for_packed_batches(device_type, packing) is None
    assert torch.backends.cuda.cudnn_sdp_enabled() is True


def test_make_accelerator_passes_device_and_packing_to_the_attention_kernels(cudnn_sdp_restored, monkeypatch, caplog,
                                                                            tmp_path):
    import logging

    from bert_recipes.recipe import load_recipe
    from bert_recipes.training import accelerator as acc

    seen = []
    monkeypatch.setattr(acc, "kernels_for_packed_batches", lambda device, packing: seen.append((device, packing)) or "X")
    repo = Path(__file__).resolve().parents[1]
    recipe = load_recipe(repo / "recipes/pretrain/tiny.yaml", [f"output_dir={tmp_path / 'run'}", "keep_host_memory=false"])
    with caplog.at_level(logging.INFO, logger="bert_recipes"):
        acc.make_accelerator(recipe)
    assert seen == [("cpu", "batch")]  # the device and the recipe's data.packing reach the choice
    assert "attention: X" in caplog.text


@pytest.mark.parametrize("length", [16, 24, 32, 40])
def test_bf16_forward_and_gradients_match_float64_at_every_softmax_route(length):
    """In bf16, lengths below, at and above the vector width (some softmax passes go through a
    float32 result, attention._softmax / _softmax_backward): the output and the gradients of
    q, k, v stay within bf16's rounding of a float64 computation on the same bf16 inputs and
    the same dropout mask."""
    q, k, v = (t.detach().to(torch.bfloat16).requires_grad_() for t in qkv((2, 3, length, 8), dtype=torch.float32))
    mask = masks(length=length)[1]
    grad_out = torch.randn(2, 3, length, 8, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    torch.manual_seed(0)
    out = DropoutAttention.apply(q, k, v, mask, 0.25, 8**-0.5)
    out.backward(grad_out)
    torch.manual_seed(0)
    drop = drop_mask((6, length, length), 0.25, "cpu").view(2, 3, length, length)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    scores = (q64 @ k64.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
    expected = (scores.softmax(-1).masked_fill(drop, 0) / 0.75) @ v64
    expected.backward(grad_out.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    for ours, reference in ((q.grad, q64.grad), (k.grad, k64.grad), (v.grad, v64.grad)):
        torch.testing.assert_close(ours.double(), reference, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("length", [8, 16, 24, 29, 32, 40, 64, 100])
def test_reduced_precision_softmax_passes_round_what_float32_computes(length):
    """attention._softmax and _softmax_backward in bf16: each element within one bf16 rounding
    (relative 2**-8) of the float32 computation, whichever kernel the length takes."""
    gen = torch.Generator().manual_seed(length)
    x = (torch.randn(4, 3, length, length, generator=gen) * 4).to(torch.bfloat16)
    grad = torch.randn(4, 3, length, length, generator=gen).to(torch.bfloat16)
    probs = torch.empty_like(x)
    attention._softmax(x, probs)
    exact = torch.softmax(x.float(), -1)
    torch.testing.assert_close(probs.float(), exact, rtol=2**-8, atol=1e-6)
    ours = attention._softmax_backward(grad, probs)
    p = probs.float()
    exact_grad = p * (grad.float() - (grad.float() * p).sum(-1, keepdim=True))
    assert ours.dtype == torch.bfloat16
    torch.testing.assert_close(ours.float(), exact_grad, rtol=2**-7, atol=1e-3)

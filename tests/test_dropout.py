"""Dropout from raw random bits (bert_recipes/dropout.py): its masks' rate and independence,
the function the CPU module computes and its gradient, where it hands back to nn.Dropout,
and that swapping it into a BERT changes neither the state dict nor evaluation."""

import pytest
import torch

from bert_recipes.dropout import Dropout, drop_mask, fill_keep, keep_mask, use_bits_dropout


def test_drop_mask_rate_and_independence():
    torch.manual_seed(0)
    drop = drop_mask((1000, 4096), 0.1, "cpu")
    assert drop.dtype == torch.bool and drop.shape == (1000, 4096)
    rate = drop.double().mean().item()
    assert abs(rate - 0.1) < 6 * (0.09 / drop.numel()) ** 0.5  # within 6 sigma of p
    # the two 32-bit halves of one 64-bit draw are independent: neighbours co-drop at p**2
    pairs = (drop.flatten()[0::2] & drop.flatten()[1::2]).double().mean().item()
    assert abs(pairs - 0.01) < 6 * (0.0099 / (drop.numel() / 2)) ** 0.5
    odd = drop_mask((3, 5), 0.5, "cpu")  # an odd element count
    assert odd.shape == (3, 5)
    assert not drop_mask((64,), 0.0, "cpu").any()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        drop_mask((4,), 1.0, "cpu")


def test_drop_mask_near_one_drops_everything_but_never_wraps():
    torch.manual_seed(0)
    for p in (1 - 2**-30, 1 - 2**-34, 1 - 1e-12):
        assert drop_mask((1 << 16,), p, "cpu").all()


def test_keep_masks_are_the_complement_of_the_same_draw_in_any_dtype_and_in_pieces():
    torch.manual_seed(3)
    drop = drop_mask((4, 6, 10), 0.3, "cpu")
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        torch.manual_seed(3)
        keep = keep_mask((4, 6, 10), 0.3, "cpu", dtype)
        assert keep.dtype == dtype and set(keep.unique().tolist()) == {0.0, 1.0}
        assert torch.equal(keep == 0, drop)
    # drawn in even-sized pieces into a reused buffer: the same draw as one call
    torch.manual_seed(3)
    pieces = torch.empty(4, 6, 10, dtype=torch.bool)
    bits = torch.empty(30, dtype=torch.int64)
    for i in range(4):
        fill_keep(pieces[i], 0.3, bits)
    assert torch.equal(~pieces, drop)


def test_cpu_dropout_is_inverted_dropout_with_the_drawn_mask_and_its_gradient():
    x = torch.randn(8, 16, 32, dtype=torch.float64, requires_grad=True)
    layer = Dropout(0.25).train()
    torch.manual_seed(0)
    y = layer(x)
    torch.manual_seed(0)
    drop = drop_mask(x.shape, 0.25, "cpu")
    torch.testing.assert_close(y, x.masked_fill(drop, 0) / 0.75, rtol=0, atol=1e-15)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (~drop).double() / 0.75, rtol=0, atol=1e-15)

    def f(x):
        torch.manual_seed(0)  # the same mask at every evaluation
        return layer(x)

    assert torch.autograd.gradcheck(f, (x[:2, :3, :4].detach().clone().requires_grad_(),))


def test_the_scale_stays_exact_in_bfloat16():
    """1 / (1 - p) is applied as a float scalar, not stored in bf16 (1/0.9 would be 1.109375)."""
    x = torch.ones(1 << 16, dtype=torch.bfloat16)
    torch.manual_seed(0)
    y = Dropout(0.1).train()(x)
    kept = y[y != 0]
    assert torch.equal(kept, torch.full_like(kept, 1 / 0.9))  # bf16(1.111...) = 1.1111, not 1.109375
    rate = (y == 0).double().mean().item()
    assert abs(rate - 0.1) < 6 * (0.09 / x.numel()) ** 0.5


def test_where_it_is_nn_dropout():
    x = torch.randn(4, 8)
    layer = Dropout(0.5)
    assert torch.equal(layer.eval()(x), x)  # evaluation: identity
    assert torch.equal(Dropout(0.0).train()(x), x)
    assert not Dropout(1.0).train()(x).any()  # p = 1: nn.Dropout's zeros
    ids = torch.arange(6)
    assert torch.equal(Dropout(0.0).train()(ids), ids)
    # nn.Dropout's own draw (bernoulli_) wherever the CPU path does not run
    torch.manual_seed(1)
    ours = Dropout(0.5).train()(x)
    torch.manual_seed(1)
    stock = torch.nn.Dropout(0.5).train()(x)
    assert not torch.equal(ours, stock)  # a different draw on the CPU
    meta = torch.empty(4, 8, device="meta")
    assert Dropout(0.5).train()(meta).device.type == "meta"  # off the CPU: nn.Dropout
    # inside torch.func transforms: nn.Dropout's own draw (the autograd function has no setup_context)
    for transform in (torch.func.grad, lambda f: torch.func.vmap(f, randomness="same")):
        torch.manual_seed(2)
        ours = transform(lambda t: Dropout(0.5).train()(t).sum())(x)
        torch.manual_seed(2)
        assert torch.equal(ours, transform(lambda t: torch.nn.Dropout(0.5).train()(t).sum())(x))


def test_use_bits_dropout_swaps_every_dropout_and_changes_no_weights_or_evaluation():
    from transformers import BertConfig, BertForPreTraining

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.1)
    torch.manual_seed(0)
    model = BertForPreTraining(config)
    reference = BertForPreTraining(config)
    reference.load_state_dict(model.state_dict())
    keys = list(model.state_dict())
    assert use_bits_dropout(model) is model
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    assert dropouts and all(type(m) is Dropout for m in dropouts)
    assert sorted({m.p for m in dropouts}) == [0.1, 0.2]
    assert list(model.state_dict()) == keys
    use_bits_dropout(model)  # idempotent
    assert all(type(m) is Dropout for m in model.modules() if isinstance(m, torch.nn.Dropout))
    ids = torch.randint(5, 100, (2, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=ids).prediction_logits, reference.eval()(input_ids=ids).prediction_logits)
    use_bits_dropout(model, enabled=False)
    assert all(type(m) is torch.nn.Dropout for m in model.modules() if isinstance(m, torch.nn.Dropout))


def test_a_training_step_is_reproducible_from_the_generator_state():
    """The masks come from the default generator: restoring its state (as a resumed run
    does) replays them exactly."""
    layer = Dropout(0.1).train()
    x = torch.randn(32, 64)
    state = torch.get_rng_state()
    first = layer(x)
    torch.set_rng_state(state)
    assert torch.equal(layer(x), first)

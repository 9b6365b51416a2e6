"""Attention with BERT's attention dropout at the speed of the CPU: the ``sdpa_dropout``
implementation, registered with transformers' ``AttentionInterface``.

BERT trains with dropout on the attention probabilities (``attention_probs_dropout_prob``,
0.1 in google-research/bert). PyTorch's fused CPU kernel for
``scaled_dot_product_attention`` takes no dropout, so a training step on a CPU falls back to
SDPA's math path: the scores, softmax, a ``bernoulli_`` mask and the two matmuls, each a
separate op with its own autograd node (2.8-3.5x the fused kernel at ``[4, 12, 512, 64]``;
``benchmarks/attention_dropout.py``). :class:`DropoutAttention` computes the same function in
one autograd node: the scale folded into the queries, the mask applied in place, a softmax
backward in one kernel, and the dropout mask drawn as raw random bits (one 64-bit draw per two
probabilities, dropped where a 32-bit half is below ``p * 2**32``: a drop probability
exact to 2**-32, finer than the float32 uniform TensorFlow's dropout compares).

Everything else goes to transformers' own SDPA function unchanged: evaluation and inference
(no dropout: the fused kernel), dropout 0, and every device but the CPU (CUDA's fused kernels
take dropout). Recipes with ``model.attn_implementation: sdpa`` (the default) run on this
implementation (:func:`runtime_attention`); a checkpoint records no attention
implementation, so exports are unchanged.
"""

from __future__ import annotations

import torch

#: The name :func:`register` gives this implementation in transformers' ``AttentionInterface``.
NAME = "sdpa_dropout"


#: Elements of one block of scores (``[c, Lq, Lk]``): 2 MiB in fp32, so that a block's scores,
#: probabilities and their gradients stay in a core's L2 cache between the ops on them.
BLOCK_ELEMENTS = 2**19


class DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scale + mask), p) @ v`` with a hand-written backward.

    Shapes: ``q`` ``[B, heads, Lq, d]``, ``k``/``v`` ``[B, heads, Lk, d]``, one floating
    dtype; ``mask`` broadcastable to ``[B, heads, Lq, Lk]``: boolean (True = attend) or
    additive, or None. Returns ``[B, heads, Lq, d]``.

    The ``B * heads`` score matrices are processed in blocks of :data:`BLOCK_ELEMENTS`, each
    block's ops running back to back while it is in cache (SDPA's math path streams every
    ``[B, heads, Lq, Lk]`` intermediate through memory once per op). The dropout mask is drawn
    once for the whole call (:func:`drop_mask`). Saved for backward: the probabilities and
    the boolean drop mask (SDPA's math path also saves the dropped probabilities); the
    backward re-applies the mask block by block (peak memory at ``[4, 12, 512, 64]``: about
    half SDPA's math path). Softmax runs in the inputs' dtype (the CPU kernel accumulates
    bf16 in fp32) and the probabilities are kept in it: in bf16 the error is bf16 eager
    attention's, about twice that of SDPA's math path, which upcasts. A query row masked
    everywhere gets uniform weights (SDPA's math path gives NaN there; transformers' masks
    never make one). No double backward (the backward writes into preallocated tensors):
    gradient penalties need ``attn_implementation: eager``.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, scale: float):
        batch, heads, len_q, len_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        n = batch * heads
        with torch.autocast(q.device.type, enabled=False):  # q, k, v share a dtype already
            q_scaled = (q * scale).reshape(n, len_q, -1)
            k, v = k.reshape(n, len_k, -1), v.reshape(n, len_k, -1)
            masked_out = bias = None  # per score matrix: [n, len_q, len_k]
            if mask is not None and mask.dtype == torch.bool:
                masked_out = (~mask).expand(batch, heads, len_q, len_k).reshape(n, len_q, len_k)
            elif mask is not None:
                bias = mask.to(q.dtype).expand(batch, heads, len_q, len_k).reshape(n, len_q, len_k)
            drop = drop_mask((n, len_q, len_k), p, q.device)
            probs = torch.empty(n, len_q, len_k, dtype=q.dtype, device=q.device)
            out = torch.empty(n, len_q, v.shape[-1], dtype=q.dtype, device=q.device)
            for s in _blocks(n, len_q * len_k):
                scores = torch.bmm(q_scaled[s], k[s].transpose(1, 2))
                if masked_out is not None:
                    scores.masked_fill_(masked_out[s], torch.finfo(scores.dtype).min)
                elif bias is not None:
                    scores.add_(bias[s])
                torch.softmax(scores, dim=-1, out=probs[s])
                torch.bmm(_dropout(probs[s], drop[s], p), v[s], out=out[s])
        ctx.save_for_backward(q_scaled, k, v, probs, drop)
        ctx.p, ctx.scale, ctx.shape = p, scale, (batch, heads)
        return out.view(batch, heads, len_q, -1)

    @staticmethod
    def backward(ctx, grad_out):
        q_scaled, k, v, probs, drop = ctx.saved_tensors
        n, len_q, len_k = probs.shape
        grad_out = grad_out.reshape(n, len_q, -1)
        grad_q, grad_k, grad_v = torch.empty_like(q_scaled), torch.empty_like(k), torch.empty_like(v)
        for s in _blocks(n, len_q * len_k):
            torch.bmm(_dropout(probs[s], drop[s], ctx.p).transpose(1, 2), grad_out[s], out=grad_v[s])
            grad_probs = _dropout(torch.bmm(grad_out[s], v[s].transpose(1, 2)), drop[s], ctx.p, inplace=True)
            grad_scores = torch._softmax_backward_data(grad_probs, probs[s], -1, probs.dtype)
            torch.bmm(grad_scores, k[s], out=grad_q[s])
            torch.bmm(grad_scores.transpose(1, 2), q_scaled[s], out=grad_k[s])
        grad_q.mul_(ctx.scale)
        return (grad_q.view(*ctx.shape, len_q, -1), grad_k.view(*ctx.shape, len_k, -1),
                grad_v.view(*ctx.shape, len_k, -1), None, None, None)


def _dropout(x: torch.Tensor, drop: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """``x`` zeroed where ``drop`` and scaled by ``1 / (1 - p)``: inverted dropout with a drawn mask."""
    return (x.masked_fill_(drop, 0) if inplace else x.masked_fill(drop, 0)).mul_(1.0 / (1.0 - p))


def _blocks(n: int, elements_per_matrix: int):
    """Slices of ``range(n)`` holding about :data:`BLOCK_ELEMENTS` score elements each."""
    step = max(1, BLOCK_ELEMENTS // elements_per_matrix)
    return [slice(i, min(i + step, n)) for i in range(0, n, step)]


def drop_mask(shape, p: float, device) -> torch.Tensor:
    """A boolean mask of ``shape``, each element True (dropped) with probability ``p``,
    independently, from the default generator of ``device``.

    Raw 32-bit random integers (``random_`` over int64, read as int32 pairs) compared with
    ``round(p * 2**32)`` (at most 2**32 - 1): the drop probability is ``p`` to within 2**-32,
    and the draw about 1.5x faster on a CPU than ``bernoulli_`` with a float probability.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    numel = 1
    for size in shape:
        numel *= int(size)
    bits = torch.empty((numel + 1) // 2, dtype=torch.int64, device=device).random_(-2**63, 2**63 - 1)
    threshold = -2**31 + min(round(p * 2**32), 2**32 - 1)  # int32 values are uniform on [-2**31, 2**31)
    return (bits.view(torch.int32)[:numel] < threshold).view(shape)


def sdpa_dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface function: :class:`DropoutAttention` while training
    BERT's bidirectional attention with dropout on a CPU, transformers' ``sdpa_attention_forward``
    otherwise (see :func:`runs_fused_dropout`).

    Shapes as that interface: ``query/key/value`` ``[B, heads, L, d]``, ``attention_mask``
    from the SDPA mask function (boolean ``[B, 1, L, L]``) or None; returns
    ``([B, L, heads, d], None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not runs_fused_dropout(module, query, key, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = DropoutAttention.apply(query, key.to(query.dtype), value.to(query.dtype), attention_mask, dropout, scale)
    return out.transpose(1, 2).contiguous(), None


def runs_fused_dropout(module, query, key, attention_mask, dropout: float, kwargs: dict) -> bool:
    """True when :class:`DropoutAttention` computes what SDPA would: dropout > 0 on a CPU, not
    under ``torch.compile`` (Inductor fuses SDPA's math path itself; ``random_`` would break
    the graph), non-empty, bidirectional (a causal module without a mask relies on SDPA's
    ``is_causal``), no grouped key/value heads, no ``position_bias``/``softcap``/attention
    outputs, and no mask that needs a gradient."""
    return (dropout > 0.0 and query.device.type == "cpu" and not torch.compiler.is_compiling()
            and query.numel() > 0 and key.shape[2] > 0
            and not (attention_mask is None and (kwargs.get("is_causal") or getattr(module, "is_causal", False)))
            and getattr(module, "num_key_value_groups", 1) == 1
            and all(kwargs.get(name) is None for name in ("position_bias", "softcap"))
            and not kwargs.get("output_attentions")
            and not (attention_mask is not None and attention_mask.requires_grad))


def register() -> None:
    """Register :data:`NAME` with transformers' ``AttentionInterface`` (and SDPA's boolean
    mask with its ``AttentionMaskInterface``, without which transformers passes no mask to a
    custom implementation). Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, sdpa_dropout_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def runtime_attention(attn_implementation: str) -> str:
    """The implementation a model runs for a recipe's ``model.attn_implementation``:
    ``sdpa`` becomes :data:`NAME` (registered here), the others stay as they are."""
    if attn_implementation != "sdpa":
        return attn_implementation
    register()
    return NAME

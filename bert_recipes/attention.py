"""Attention with BERT's attention dropout at the speed of the CPU: the ``sdpa_dropout``
implementation, registered with transformers' ``AttentionInterface``.

BERT trains with dropout on the attention probabilities (``attention_probs_dropout_prob``,
0.1 in google-research/bert). PyTorch's fused CPU kernel for
``scaled_dot_product_attention`` takes no dropout, so a training step on a CPU falls back to
SDPA's math path: the scores, softmax, a ``bernoulli_`` mask and the two matmuls, each a
separate op with its own autograd node (2.8-3.5x the fused kernel at ``[4, 12, 512, 64]``;
``benchmarks/attention_dropout.py``). :class:`DropoutAttention` computes the same function in
one autograd node: the scale folded into the queries, the mask added in place, a softmax
backward in one kernel, and the dropout mask drawn as raw random bits
(:func:`~bert_recipes.dropout.fill_keep`: a drop probability exact to 2**-32, finer than the
float32 uniform TensorFlow's dropout compares).

Training in bf16 without attention dropout runs the same blocks without a mask, up to keys
of 512: PyTorch's fused CPU kernel has a slow bf16 backward there (forward + backward, 1
thread: 4.5x ours at ``[32, 12, 128, 32]``, 1.3x at ``[4, 12, 512, 64]``, 0.55x at 1024;
benchmarks/RESULTS.md). Everything else goes to transformers' own SDPA function unchanged:
evaluation and inference (the fused kernel is faster there), dropout 0 in float32 (the same
speed) or past 512 keys, ``torch.func`` transforms, and every device but the CPU (CUDA's fused
kernels take dropout). Recipes with ``model.attn_implementation: sdpa`` (the default) run on this
implementation (:func:`runtime_attention`); a checkpoint records no attention
implementation, so exports are unchanged.
"""

from __future__ import annotations

import functools

import torch

from .dropout import fill_keep, functorch_wrapped

#: The name :func:`register` gives this implementation in transformers' ``AttentionInterface``.
NAME = "sdpa_dropout"


#: Elements of one block of scores (``[b, h, Lq, Lk]``): 2 MiB in fp32, so that a block's scores,
#: probabilities and their gradients stay in a core's L2 cache between the ops on them.
BLOCK_ELEMENTS = 2**19


class DropoutAttention(torch.autograd.Function):
    """``dropout(softmax(q k^T * scale + mask), p) @ v`` with a hand-written backward.

    Shapes: ``q`` ``[B, heads, Lq, d]``, ``k``/``v`` ``[B, heads, Lk, d]``, one floating
    dtype; ``mask`` broadcastable to ``[B, heads, Lq, Lk]``: boolean (True = attend) or
    additive, or None. Returns ``[B, heads, Lq, d]``.

    The score matrices are processed in blocks of about :data:`BLOCK_ELEMENTS` (whole batch
    rows, or a range of one row's heads), each block's ops running back to back while it is
    in cache (SDPA's math path streams every ``[B, heads, Lq, Lk]`` intermediate through
    memory once per op). A boolean mask becomes an additive one once per call (a broadcast
    add is about 10x faster than a broadcast ``masked_fill_`` on a CPU). The dropout's keep
    mask, 1.0/0.0 in the inputs' dtype, is drawn block by block while the block is in cache
    (:func:`~bert_recipes.dropout.fill_keep`: with even-sized blocks, the complement of one
    ``drop_mask`` over the whole call) and applied by a multiply; the ``1 / (1 - p)`` scales
    the ``[.., Lq, d]`` output and gradient instead of the scores. Saved for backward: the
    probabilities and the keep mask, both ``[B, heads, Lq, Lk]`` in the inputs' dtype (SDPA's
    math path saves the probabilities, the dropped probabilities and a boolean mask); the
    backward works block by block. At ``p`` 0 no mask is drawn or saved (and no random
    number consumed): plain softmax attention.
    Softmax runs in the inputs' dtype (the CPU kernel accumulates bf16 in fp32; rows of a length
    where that kernel is slow go through a float32 result, :func:`_softmax`) and the
    probabilities are kept in it: in bf16 the error is bf16 eager attention's, about twice
    that of SDPA's math path, which upcasts. A query row masked everywhere gets uniform
    weights (SDPA's math path gives NaN there; transformers' masks never make one). No
    double backward (the backward writes into preallocated tensors): gradient penalties need
    ``attn_implementation: eager``.
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, p: float, scale: float):
        batch, heads, len_q, len_k = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
        blocks = _blocks(batch, heads, len_q * len_k)
        with torch.autocast(q.device.type, enabled=False):  # q, k, v share a dtype already
            q_scaled, k, v = _scaled(q, scale), k.contiguous(), v.contiguous()
            bias = None if mask is None else _additive(mask, q.dtype)  # broadcastable to the scores
            probs = torch.empty(batch, heads, len_q, len_k, dtype=q.dtype, device=q.device)
            keep = torch.empty(batch, heads, len_q, len_k, dtype=q.dtype, device=q.device) if p > 0 else None
            bits = torch.empty((probs[blocks[0]].numel() + 1) // 2, dtype=torch.int64, device=q.device) if p > 0 else None
            out = torch.empty(batch, heads, len_q, v.shape[-1], dtype=q.dtype, device=q.device)
            for s in blocks:
                scores = torch.matmul(q_scaled[s], k[s].transpose(-1, -2))
                if bias is not None:
                    scores.add_(bias[_rows(bias, s)])
                _softmax(scores, probs[s])
                if keep is None:  # p = 0: no mask, no draw
                    torch.matmul(probs[s], v[s], out=out[s])
                    continue
                fill_keep(keep[s], p, bits)  # 1.0 / 0.0, drawn block by block, in cache
                torch.matmul(probs[s] * keep[s], v[s], out=out[s])
            if keep is not None:
                out.mul_(1.0 / (1.0 - p))
        ctx.save_for_backward(q_scaled, k, v, probs, keep)
        ctx.p, ctx.scale, ctx.blocks = p, scale, blocks
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_scaled, k, v, probs, keep = ctx.saved_tensors
        grad_out = _scaled(grad_out, 1.0 / (1.0 - ctx.p))  # the dropout's scale, on [B, heads, Lq, d]
        grad_q, grad_k, grad_v = torch.empty_like(q_scaled), torch.empty_like(k), torch.empty_like(v)
        for s in ctx.blocks:
            dropped = probs[s] if keep is None else probs[s] * keep[s]
            torch.matmul(dropped.transpose(-1, -2), grad_out[s], out=grad_v[s])
            grad_probs = torch.matmul(grad_out[s], v[s].transpose(-1, -2))
            if keep is not None:
                grad_probs.mul_(keep[s])
            grad_scores = _softmax_backward(grad_probs, probs[s])
            torch.matmul(grad_scores, k[s], out=grad_q[s])
            torch.matmul(grad_scores.transpose(-1, -2), q_scaled[s], out=grad_k[s])
        grad_q.mul_(ctx.scale)
        return grad_q, grad_k, grad_v, None, None, None


@functools.cache
def _avx512() -> bool:
    """Whether torch's CPU kernels run their AVX512 builds here (every CPU that ``precision:
    auto`` gives bf16 has AVX512)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def _bf16_on_avx512(x: torch.Tensor) -> bool:
    return x.dtype == torch.bfloat16 and x.device.type == "cpu" and _avx512()


def _softmax(scores: torch.Tensor, out: torch.Tensor) -> None:
    """``out = softmax(scores, -1)`` (same shape and dtype). On an AVX512 CPU, bf16 rows of 16 to
    95 elements whose length leaves 8 or more past a multiple of 32 go through a float32 result,
    cast once: torch's bf16 kernel handles the elements past the last 32 slowly. Measured at
    ``[32, 12, L, L]``, 1 thread (lower quartile of 40 calls; benchmarks/RESULTS.md): at L 24 /
    28 / 44 / 56 / 88, 1.43 / 1.98 / 2.51 / 3.54 / 6.11 ms in bf16 against 0.46 / 0.57 / 1.16 /
    1.81 / 5.02 ms through float32; the bf16 kernel stays faster below 16, at tails under 8
    (32-36, 64-68) and from 96 on. The kernel accumulates in float32 either way: the two
    differ only in the rounding of a few elements."""
    length = scores.shape[-1]
    if _bf16_on_avx512(scores) and 16 <= length < 96 and length % 32 >= 8:
        out.copy_(torch.softmax(scores, dim=-1, dtype=torch.float32))
    else:
        torch.softmax(scores, dim=-1, out=out)


def _softmax_backward(grad_probs: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The softmax's input gradient, ``probs * (grad_probs - sum(grad_probs * probs, -1))``, in
    ``probs``' dtype. On an AVX512 CPU, bf16 rows of 16 to 31 elements go through float32:
    torch's bf16 kernel is 3-10x slower there (``[32, 12, L, L]``, 1 thread: 0.69 / 1.04 / 1.30
    ms at L 16 / 24 / 29 against 0.07 / 0.24 / 0.39 ms through float32, casts included); it is
    as fast below 16 and faster from 32 on."""
    if _bf16_on_avx512(probs) and 16 <= probs.shape[-1] < 32:
        return torch._softmax_backward_data(grad_probs.float(), probs.float(), -1, torch.float32).to(probs.dtype)
    return torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x * factor`` as a new contiguous tensor, in one pass."""
    return torch.mul(x, factor, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``mask`` as a 4-d additive mask in ``dtype``: a boolean one (True = attend) becomes 0
    and the dtype's most negative value; an additive one is cast (a new tensor) and clamped
    to that value."""
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.dtype != torch.bool:  # a float32 minimum cast to bf16 is -inf: clamped, finite as SDPA's
        return mask.to(dtype).clamp_(min=torch.finfo(dtype).min)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


def _rows(bias: torch.Tensor, block: tuple) -> tuple:
    """The index of ``bias`` (4-d, each leading dimension 1 or full) for a block of scores."""
    return tuple(slice(None) if bias.shape[i] == 1 else block[i] for i in range(2))


def _blocks(batch: int, heads: int, elements_per_matrix: int) -> list:
    """Index pairs ``(batch slice, head slice)`` covering ``[batch, heads]``, each holding about
    :data:`BLOCK_ELEMENTS` score elements: whole batch rows while one row's heads fit, else
    ranges of one row's heads."""
    per_block = max(1, BLOCK_ELEMENTS // elements_per_matrix)  # score matrices per block
    if per_block >= heads:
        rows = per_block // heads
        return [(slice(b, min(b + rows, batch)), slice(None)) for b in range(0, batch, rows)]
    return [(slice(b, b + 1), slice(h, min(h + per_block, heads))) for b in range(batch) for h in range(0, heads, per_block)]


def sdpa_dropout_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers' attention-interface function: :class:`DropoutAttention` while training
    BERT's bidirectional attention with dropout on a CPU, transformers' ``sdpa_attention_forward``
    otherwise (see :func:`runs_blocked`).

    Shapes as that interface: ``query/key/value`` ``[B, heads, L, d]``, ``attention_mask``
    from the SDPA mask function (boolean ``[B, 1, L, L]``) or None; returns
    ``([B, L, heads, d], None)``.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if not runs_blocked(module, query, key, value, attention_mask, dropout, kwargs):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out = DropoutAttention.apply(query, key.to(query.dtype), value.to(query.dtype), attention_mask, dropout, scale)
    return out.transpose(1, 2).contiguous(), None


#: The longest key sequence that bf16 training without dropout runs blocked: forward + backward
#: at ``[4, 12, 512, 64]`` 1.33x SDPA, at ``[2, 12, 640, 64]`` even, at 768 0.72-0.88x and at
#: 1024 0.55x (1 and 2 threads; SDPA's fused kernel also saves no ``[L, L]`` probabilities).
BF16_NO_DROPOUT_MAX_LENGTH = 512


def runs_blocked(module, query, key, value, attention_mask, dropout: float, kwargs: dict) -> bool:
    """True when :class:`DropoutAttention` runs instead of SDPA: on a CPU, for dropout > 0, or
    for dropout 0 in bf16 in a module in training mode with keys of at most
    :data:`BF16_NO_DROPOUT_MAX_LENGTH` (PyTorch's fused CPU kernel is slow to differentiate in
    bf16; see the module docstring). The mode, not the gradient mode, decides, so that
    evaluation gives the same values with or without a gradient and a recomputed checkpoint
    runs the kernel its first forward ran. Also required: not under ``torch.compile``
    (Inductor fuses SDPA's math path itself; ``random_`` would break the graph) nor a
    ``torch.func`` transform (the autograd function has no ``setup_context``), non-empty,
    bidirectional (a causal module without a mask relies on SDPA's ``is_causal``), no grouped
    key/value heads, no ``position_bias``/``softcap``/attention outputs, and no mask that
    needs a gradient."""
    trains_bf16 = (query.dtype == torch.bfloat16 and getattr(module, "training", False)
                   and key.shape[2] <= BF16_NO_DROPOUT_MAX_LENGTH)
    return ((dropout > 0.0 or trains_bf16) and query.device.type == "cpu" and not torch.compiler.is_compiling()
            and not functorch_wrapped(query)
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


def kernels_for_packed_batches(device_type: str, packing) -> str | None:
    """On a CUDA device with packed batches (``data.packing`` true or ``batch``), turn off
    cuDNN's SDPA backend (``torch.backends.cuda.enable_cudnn_sdp(False)``), so the masked
    attention runs on PyTorch's memory-efficient kernel (flash takes no mask); returns a line
    for the log, or None on another device or without packing (nothing changed).

    cuDNN builds an execution plan for every new problem shape, and packed batches change
    shape from step to step (``batch``: the row count; ``true``: the row width, less often).
    Measured on an H200 with ``batch`` packing (bert-base, seq 128, batch 128, bf16,
    ``benchmarks/gpu.sh``): our packed step ran at 0.66-0.93x stock transformers with cuDNN's
    backend and 1.35-1.39x without it; padded batches (one shape) ran at the same speed
    either way, so a setting left off for a later padded run costs nothing. The setting is
    process-wide and stays off for the rest of the process (later cells of a ``glue`` sweep
    included); each call that asks for it returns the line again.
    """
    if device_type != "cuda" or not packing:
        return None
    torch.backends.cuda.enable_cudnn_sdp(False)
    return ("cuDNN's SDPA backend off (packed batches change shape, and cuDNN plans per shape): "
            "the memory-efficient kernel")


def runtime_attention(attn_implementation: str) -> str:
    """The implementation a model runs for a recipe's ``model.attn_implementation``:
    ``sdpa`` becomes :data:`NAME` (registered here), the others stay as they are."""
    if attn_implementation != "sdpa":
        return attn_implementation
    register()
    return NAME

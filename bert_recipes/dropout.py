"""Dropout masks from raw random bits, and BERT's hidden dropout on them for a CPU.

On a CPU, ``torch.nn.functional.dropout`` draws its mask with ``bernoulli_`` (a float
uniform per element, then a compare): about 6 ms for 2**20 elements on one core, more than
the layer's matmul at BERT-mini's size. A mask drawn here takes one 32-bit random integer
per element (``random_`` over int64, read as int32 pairs) and one compare: about 2.5x faster,
and the drop probability is ``p`` to within 2**-32 (finer than the float32 uniform of
TensorFlow's dropout in google-research/bert). The masks are the same distribution as
``bernoulli_``'s, drawn from the same default generator (so a checkpoint's RNG state resumes
them exactly), but not the same draws: a run is reproducible against itself, not against
``nn.Dropout``.

:class:`Dropout` is ``nn.Dropout`` with that mask while training on a CPU and ``nn.Dropout``
itself everywhere else (GPUs have a fused dropout kernel; ``torch.compile`` fuses its own);
:func:`use_bits_dropout` swaps it into a model. It has no parameters, so state dicts and
exports are unchanged. ``sdpa_dropout`` (bert_recipes/attention.py) draws its attention
dropout with :func:`fill_keep`, block by block.
"""

from __future__ import annotations

import torch


def _threshold(p: float) -> int:
    """The int32 below which a uniform int32 is dropped: probability ``round(p * 2**32) / 2**32``,
    capped at ``1 - 2**-32`` (so that it never wraps near p = 1).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p}")
    return -2**31 + min(round(p * 2**32), 2**32 - 1)


def _random_int32(numel: int, device, bits: torch.Tensor | None = None) -> torch.Tensor:
    """``numel`` independent int32 values, uniform over ``[-2**31, 2**31)`` (shape ``[numel]``):
    ``random_`` over int64, read as int32 pairs, drawn into ``bits`` (int64) when it is large
    enough (a reused buffer: no fresh pages to fault in)."""
    need = (numel + 1) // 2
    if bits is None or bits.numel() < need:
        bits = torch.empty(need, dtype=torch.int64, device=device)
    return bits[:need].random_(-2**63, 2**63 - 1).view(torch.int32)[:numel]


def fill_keep(out: torch.Tensor, p: float, bits: torch.Tensor | None = None) -> torch.Tensor:
    """Fill the contiguous tensor ``out`` with a keep mask (each element kept with probability
    ``1 - p``, independently, from the default generator of its device) and return it: True
    and False for a boolean ``out``, 1.0 and 0.0 for a floating one. ``bits``: an optional
    int64 buffer for the draw (see :func:`_random_int32`).

    Consecutive calls draw what one call over their concatenation would, when every call but
    the last fills an even number of elements.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    threshold = _threshold(p)
    return torch.ge(_random_int32(out.numel(), out.device, bits).view(out.shape), threshold, out=out)


def drop_mask(shape, p: float, device) -> torch.Tensor:
    """A boolean mask of ``shape``, each element True (dropped) with probability ``p``,
    independently, from the default generator of ``device``: the complement of
    :func:`fill_keep`'s draw.

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    return ~fill_keep(torch.empty(tuple(int(size) for size in shape), dtype=torch.bool, device=device), p)


def keep_mask(shape, p: float, device, dtype: torch.dtype) -> torch.Tensor:
    """:func:`fill_keep` into a new tensor of ``shape`` and ``dtype``: multiplying by it and
    then by ``1 / (1 - p)`` is inverted dropout. The scale is left out so that it stays exact
    (``1 / 0.9`` is 1.109375 in bfloat16).

    Raises:
        ValueError: ``p`` outside ``[0, 1)``.
    """
    return fill_keep(torch.empty(tuple(int(size) for size in shape), dtype=dtype, device=device), p)


def functorch_wrapped(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is inside a ``torch.func`` transform (``grad``, ``vmap``, ...), where
    an autograd function without ``setup_context`` cannot run."""
    wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(wrapped and wrapped(tensor))


class _BitsDropout(torch.autograd.Function):
    """``x * keep / (1 - p)`` with ``keep = keep_mask(x.shape, p, ...)``; the backward
    multiplies the gradient by the same. Saved for backward: the mask (``x``'s dtype)."""

    @staticmethod
    def forward(ctx, x, p: float):
        keep = keep_mask(x.shape, p, x.device, x.dtype)
        ctx.save_for_backward(keep)
        ctx.scale = 1.0 / (1.0 - p)
        return (x * keep).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad * keep).mul_(ctx.scale), None


class Dropout(torch.nn.Dropout):
    """``nn.Dropout`` whose mask, while training on a CPU, comes from :func:`keep_mask`.

    Same shapes, semantics and state dict as ``nn.Dropout``. Falls back to it in
    evaluation, at ``p`` of 0 or 1, for non-floating inputs, off the CPU, under
    ``torch.compile`` and inside ``torch.func`` transforms (``vmap``, ``grad``: where
    ``nn.Dropout``'s own rules on randomness apply). ``inplace`` is accepted but the CPU path
    returns a new tensor.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.training and 0.0 < self.p < 1.0 and x.device.type == "cpu" and x.is_floating_point()
                and x.numel() > 0 and not torch.compiler.is_compiling() and not functorch_wrapped(x)):
            return _BitsDropout.apply(x, self.p)
        return super().forward(x)


def use_bits_dropout(model: torch.nn.Module, enabled: bool = True) -> torch.nn.Module:
    """Replace every ``torch.nn.Dropout`` of ``model`` (exactly that class) by
    :class:`Dropout` with the same ``p`` and ``inplace``, in place; with ``enabled=False``
    the reverse. Returns ``model``; idempotent."""
    old, new = (torch.nn.Dropout, Dropout) if enabled else (Dropout, torch.nn.Dropout)
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is old:
                setattr(parent, name, new(child.p, child.inplace))
    return model

"""Padding-free batches: several instances per row, each keeping its own positions, token
types and attention.

With ``data.packing`` the stream (:func:`pack_rows`) gathers ``data.packing_window``
instances at a time and packs them with first-fit-decreasing into rows of at most
``max_seq_length`` tokens; a batch is then ``per_device_train_batch_size`` ROWS, holding a
varying number of instances (as NVIDIA's packed BERT). The packer's pending instances and
rows are part of the stream state, so resume stays exact. :class:`PackedCollator` lays
rows out as tensors; given plain instances (held-out batches, fine-tuning) it packs them
within the batch. The model side (positions restarting per instance, a block-diagonal
attention mask, the pooler on each [CLS]) is :func:`bert_recipes.modeling.encode`, on the
stock ``BertForPreTraining`` weights: state dicts and exports are unchanged.

A packed batch holds, for R rows of length L and N instances:

- ``input_ids``, ``token_type_ids``, ``labels``, ``attention_mask``: ``[R, L]`` (labels -100
  and mask 0 on padding);
- ``position_ids``: ``[R, L]``, restarting at 0 for every instance;
- ``segment_ids``: ``[R, L]``, 1, 2, ... for the instances of a row, 0 on padding;
  attention is confined to equal segment ids;
- ``cls_index``: ``[N]``, the flat position (``row * L + column``) of each instance's [CLS];
- ``cu_seq_lens``: ``[S + 1]`` int32, the segment boundaries of the ``R * L`` flattened
  positions (each instance, and each row's padding tail), for a variable-length attention
  kernel (:func:`bert_recipes.modeling.packed_inputs`);
- ``next_sentence_label``: ``[N]``, in the order of ``cls_index`` (the batch's order);
- ``masked_lm_positions``: ``[M]``, the flat positions of the masked tokens (pretraining rows).
"""

from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np
import torch

from .collator import masked_lm_positions, padded_length
from ..modeling import cu_seq_lens
from .masking import IGNORE_INDEX


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Rows of item indices whose lengths sum to at most ``capacity`` (first fit, longest first;
    ties in the given order). Every length must be ``<= capacity``.

    Raises:
        ValueError: an item longer than ``capacity``.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        if lengths[i] > capacity:
            raise ValueError(f"an instance of {lengths[i]} tokens does not fit a row of {capacity}")
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(capacity - lengths[i])
    return rows


def pack_rows(items: Iterator, state: dict, capacity: int, window: int, rng: np.random.Generator) -> Iterator[list]:
    """Rows of instances from ``items``: every ``window`` instances are packed by
    :func:`first_fit_decreasing` into rows of at most ``capacity`` tokens (the rest at the
    end), and the rows of a window are yielded in a random order (``rng``; first fit
    decreasing makes them longest-first, which would swing the instances per batch).

    ``state`` (``{"window": [...], "ready": [...]}``, plain lists) holds the instances not yet
    packed and the packed rows not yet yielded; it is updated before every yield and a
    restored state continues exactly where it stopped.
    """
    def pack():
        lengths = [len(item["input_ids"]) for item in state["window"]]
        rows = first_fit_decreasing(lengths, capacity)
        state["ready"] = [[state["window"][i] for i in rows[r]] for r in rng.permutation(len(rows))]
        state["window"] = []

    while state["ready"]:
        yield state["ready"].pop(0)
    for item in items:
        state["window"].append(item)
        if len(state["window"]) >= window:
            pack()
            while state["ready"]:
                yield state["ready"].pop(0)
    if state["window"]:
        pack()
        while state["ready"]:
            yield state["ready"].pop(0)


class PackedCollator:
    """Pack a list of instances into rows (see the module docstring).

    Args:
        tokenizer: supplies ``pad_token_id``.
        pad_to_multiple_of, max_seq_length: the row length, as :class:`~.collator.PretrainingCollator`.

    ``__call__(items)`` takes rows from :func:`pack_rows` (lists of the stream's instance
    dicts: ``input_ids``, ``token_type_ids``, ``labels``, ``next_sentence_label``), or plain
    instances, which it packs within the batch; it returns the packed tensors (``torch.long``).

    Raises:
        ValueError: an empty list of instances.
    """

    # per-token keys and their padding value; per-instance keys
    token_keys = {"input_ids": None, "token_type_ids": 0, "labels": IGNORE_INDEX}
    instance_keys = ("next_sentence_label",)

    def __init__(self, tokenizer, *, pad_to_multiple_of: int = 8, max_seq_length: Optional[int] = None,
                 fill_rows: bool = False):
        self.pad_token_id = int(tokenizer.pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.max_seq_length = max_seq_length
        self.fill_rows = fill_rows  # plain instances: rows of max_seq_length, not of the batch's longest

    def __call__(self, items: Sequence) -> dict[str, torch.Tensor]:
        if not items:
            raise ValueError("PackedCollator: empty batch")
        if isinstance(items[0], dict):
            instances = list(items)
            lengths = [len(x["input_ids"]) for x in instances]
            longest = self.max_seq_length if self.fill_rows and self.max_seq_length else max(lengths)
            rows = first_fit_decreasing(lengths, padded_length(longest, self.pad_to_multiple_of, self.max_seq_length))
            used = max(sum(lengths[i] for i in row) for row in rows)
            width = padded_length(used, self.pad_to_multiple_of, self.max_seq_length)
        else:  # rows packed by the stream
            instances = [x for row in items for x in row]
            lengths = [len(x["input_ids"]) for x in instances]
            bounds = np.cumsum([0] + [len(row) for row in items])
            rows = [list(range(bounds[r], bounds[r + 1])) for r in range(len(items))]
            longest = max(sum(lengths[i] for i in row) for row in rows)
            width = padded_length(longest, self.pad_to_multiple_of, self.max_seq_length)
        shape = (len(rows), width)
        out = {key: np.full(shape, self.pad_token_id if pad is None else pad, dtype=np.int64)
               for key, pad in self.token_keys.items()}
        out.update({key: np.zeros(shape, dtype=np.int64) for key in ("attention_mask", "position_ids", "segment_ids")})
        cls_index = np.empty(len(instances), dtype=np.int64)
        for r, members in enumerate(rows):
            start = 0
            for segment, i in enumerate(members, start=1):
                n, end = lengths[i], start + lengths[i]
                for key in self.token_keys:
                    out[key][r, start:end] = instances[i][key]
                out["attention_mask"][r, start:end] = 1
                out["position_ids"][r, start:end] = np.arange(n)
                out["segment_ids"][r, start:end] = segment
                cls_index[i] = r * width + start
                start = end
        tensors = {key: torch.from_numpy(value) for key, value in out.items()}
        tensors["cls_index"] = torch.from_numpy(cls_index)
        tensors["cu_seq_lens"] = cu_seq_lens(tensors["segment_ids"])  # for flash-attn's varlen kernel, made here
        if "labels" in self.token_keys:  # pretraining rows: the masked tokens' positions
            tensors["masked_lm_positions"] = masked_lm_positions(out["labels"])
        for key in self.instance_keys:
            if key in instances[0]:
                tensors[key] = torch.tensor([x[key] for x in instances])  # int64, or float32 (STS-B scores)
        return tensors


class PackedFeatureCollator(PackedCollator):
    """:class:`PackedCollator` for fine-tuning features (``input_ids``, ``token_type_ids``,
    optional ``attention_mask``; ``labels`` one per example, int or float): the examples of a
    batch packed into rows of up to ``max_seq_length`` tokens (``fill_rows``: GLUE batches are
    grouped by length, so rows of the batch's longest example would hold one example each);
    ``labels`` ``[N]`` in the batch's order."""

    def __init__(self, tokenizer, *, pad_to_multiple_of: int = 8, max_seq_length: Optional[int] = None):
        super().__init__(tokenizer, pad_to_multiple_of=pad_to_multiple_of, max_seq_length=max_seq_length,
                         fill_rows=True)

    token_keys = {"input_ids": None, "token_type_ids": 0}
    instance_keys = ("labels",)


def packing_efficiency(batch: dict) -> float:
    """Real tokens / computed tokens (rows x row length) of a batch."""
    mask = batch["attention_mask"]
    return float(mask.sum()) / mask.numel()


__all__ = ["PackedCollator", "PackedFeatureCollator", "first_fit_decreasing", "pack_rows", "packing_efficiency"]

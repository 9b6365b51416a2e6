"""Fine-tuning data: the featurised GLUE splits of a run, and its batches.

Batches are padded per batch to a multiple of ``data.pad_to_multiple_of``
(``DataCollatorWithPadding``); with ``data.group_by_length`` the examples of a batch have
similar lengths (less padding), the grouping being random but a pure function of
(seed, epoch), so a resumed run sees exactly the batches the interrupted one would have.
Test labels are hidden (-1) and never read: test splits are featurised without ``labels``.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from ..errors import DataError
from .data import load_glue_split, tokenize_glue
from .tasks import GlueTask, predicted_by

logger = logging.getLogger("bert_recipes")

# Length grouping as transformers' LengthGroupedSampler: examples are shuffled, cut into
# "mega-batches" of this many batches, and sorted by length inside each one.
MEGABATCH_BATCHES = 50


def load_splits(recipe: FinetuneRecipe, task: GlueTask, tokenizer) -> dict:
    """Featurised splits: ``train``, the dev splits, and with ``predict_test`` the test
    split(s), and the test set of every task predicted with this task's model (MNLI: AX,
    under its task name ``ax``, when available). Raw (untokenised) splits are kept under
    ``raw/<split>`` for their ``idx`` and dev labels. ``subsampled``: the
    ``data.max_train_samples`` / ``max_eval_samples`` that cut a split here (a value at least
    the split's size cuts nothing and is left out).

    Raises:
        DataError: a split is missing or malformed, or the train split is empty.
    """
    data = recipe.data
    wanted = ["train", *task.dev_splits] + (list(task.test_splits) if recipe.predict_test else [])
    raw = {split: load_glue_split(task, split, data.glue_dir) for split in wanted}
    sources = dict.fromkeys(wanted, task)
    for other in predicted_by(task) if recipe.predict_test else ():
        try:
            raw[other.name], sources[other.name] = load_glue_split(other, "test", data.glue_dir), other
        except DataError as exc:
            logger.warning("%s not predicted: %s", other.name.upper(), exc)
    subsampled = {}
    if data.max_train_samples and data.max_train_samples < len(raw["train"]):
        raw["train"] = raw["train"].select(range(data.max_train_samples))
        subsampled["max_train_samples"] = data.max_train_samples
    for split in task.dev_splits if data.max_eval_samples else ():
        if data.max_eval_samples < len(raw[split]):
            raw[split] = raw[split].select(range(data.max_eval_samples))
            subsampled["max_eval_samples"] = data.max_eval_samples
    splits: dict = {"subsampled": subsampled}
    for split, dataset in raw.items():
        splits[split] = tokenize_glue(dataset, sources[split], tokenizer, data.max_seq_length)
        splits[f"raw/{split}"] = dataset
    if not len(splits["train"]):
        raise DataError(f"GLUE {task.name}: the train split is empty")
    return splits


class BatchPlan:
    """The training batches of every rank at every step, a pure function of (seed, epoch).

    An epoch is ``ceil(N / batch_size)`` batches: the examples are shuffled and, with
    ``group_by_length``, sorted by length inside mega-batches of ``MEGABATCH_BATCHES``
    batches; batch order is then shuffled with the longest batch first (an out-of-memory
    error shows at once). With several ranks the batch list is padded by repeating its
    first batches to a multiple of ``world``; rank r takes batches r, r + world, ...
    A step takes ``accumulation`` consecutive batches of the rank (fewer at the epoch's end).
    """

    def __init__(self, lengths: list[int], batch_size: int, accumulation: int, seed: int, group_by_length: bool,
                 rank: int = 0, world: int = 1):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.accumulation, self.seed = batch_size, accumulation, seed
        self.group_by_length, self.rank, self.world = group_by_length, rank, world
        self.steps_per_epoch = math.ceil(math.ceil(math.ceil(len(lengths) / batch_size) / world) / accumulation)
        self._cache: tuple[int, list] | None = None

    def epoch_batches(self, epoch: int) -> list[np.ndarray]:
        """All batches of ``epoch`` (example indices), before sharding across ranks."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        size = self.batch_size
        if self.group_by_length:
            mega = size * MEGABATCH_BATCHES
            chunks = [order[i:i + mega] for i in range(0, len(order), mega)]
            order = np.concatenate([c[np.argsort(-self.lengths[c], kind="stable")] for c in chunks])
        batches = [order[i:i + size] for i in range(0, len(order), size)]
        if self.group_by_length:
            batches = [batches[i] for i in rng.permutation(len(batches))]
            longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
            batches.insert(0, batches.pop(longest))
        missing = -len(batches) % self.world
        return batches + [batches[i % len(batches)] for i in range(missing)]

    def window(self, step: int) -> list[np.ndarray]:
        """This rank's micro-batches for global optimizer step ``step`` (0-based)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self.epoch_batches(epoch)[self.rank::self.world])
        mine = self._cache[1]
        return mine[k * self.accumulation:(k + 1) * self.accumulation]


def collate_batch(dataset, indices, collator, device) -> dict:
    """The examples ``indices`` of a featurised split, padded by ``collator``, on ``device``:
    ``input_ids``, ``token_type_ids``, ``attention_mask`` [B, L] (and ``labels`` [B])."""
    rows = dataset[[int(i) for i in indices]]
    features = [dict(zip(rows, values)) for values in zip(*rows.values())]
    return {key: value.to(device, non_blocking=True) for key, value in collator(features).items()}

"""Pretraining data: corpus -> instances -> masking -> collator -> loader.

Follows create_pretraining_data.py of google-research/bert, streamed: instances are built
on the fly from `datasets` streaming sources, sharded over ranks and DataLoader workers,
and resumable exactly (see :mod:`bert_recipes.data.loader`).
"""

from .collator import PretrainingCollator, padded_length
from .corpus import iter_documents, iter_raw_documents, split_sentences
from .instances import InstanceBuilder, RandomNextBuffer, truncate_seq_pair
from .loader import PretrainingStream, build_pretraining_dataloader
from .masking import MaskingVocab, create_masked_lm_predictions

__all__ = [
    "InstanceBuilder",
    "MaskingVocab",
    "PretrainingCollator",
    "PretrainingStream",
    "RandomNextBuffer",
    "build_pretraining_dataloader",
    "create_masked_lm_predictions",
    "iter_documents",
    "iter_raw_documents",
    "padded_length",
    "split_sentences",
    "truncate_seq_pair",
]

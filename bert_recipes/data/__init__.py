"""Pretraining data: corpus -> instances -> masking -> collator -> loader.

Follows create_pretraining_data.py of google-research/bert at corpus scale: a cached byte
index of the documents (index.py), a corpus-wide document permutation per pass with
random-next B drawn from the whole corpus (sources.py, reader.py), instances built on the
fly, sharded over ranks and DataLoader workers, and resumable exactly (loader.py).
"""

from .collator import PretrainingCollator, padded_length
from .corpus import iter_documents, iter_raw_documents, split_sentences
from .instances import InstanceBuilder, RandomNextBuffer, truncate_seq_pair
from .index import DocumentIndex, build_index
from .loader import build_eval_batches, build_pretraining_dataloader
from .stream import PretrainingStream
from .reader import IndexedCorpus
from .masking import MaskingVocab, create_masked_lm_predictions

__all__ = [
    "DocumentIndex",
    "IndexedCorpus",
    "build_eval_batches",
    "build_index",
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

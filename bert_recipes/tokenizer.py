"""Tokenizer resolution: which tokenizer a recipe trains with, loaded or trained.

:func:`recipe_tokenizer` is the one place that decides (a run's saved tokenizer, the
recipe's ``tokenizer_source()``, else a WordPiece vocabulary trained on the corpus with
`tokenizers`); pretraining, fine-tuning and ``inspect`` all call it.

The trained tokenizer is BERT's: BertNormalizer (lower-casing and accent stripping when
``lowercase``), BertPreTokenizer (whitespace and punctuation), WordPiece with ``##``
continuation pieces, and the special tokens [PAD] [UNK] [CLS] [SEP] [MASK]. It is returned
as a transformers ``BertTokenizer`` (the tokenizers-backed class in transformers 5), so it
saves with ``save_pretrained`` and adds ``token_type_ids``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Iterator

from .errors import UserError

logger = logging.getLogger("bert_recipes")

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WARNED: set = set()  # (tokenizer, lowercase) pairs warned about in this process
DEFAULT_MAX_LENGTH = 512  # BERT's positions; a trained tokenizer otherwise has no limit (1e30)
MODEL_INPUT_NAMES = ["input_ids", "token_type_ids", "attention_mask"]


def _iter_lines(files: Iterable[str], text_column: str = "text") -> Iterator[str]:
    """The text of ``files`` as the data reader sees it: plain text line by line (invalid
    UTF-8 replaced); JSON Lines / parquet records' ``text_column`` and compressed text through
    :func:`~bert_recipes.data.corpus.iter_records` (they were read as raw bytes: found by a helper)."""
    from .data.corpus import file_kind, iter_records
    from .recipe_files import COMPRESSION_SUFFIXES

    for path in files:
        if file_kind(path) != "text" or path.lower().endswith(COMPRESSION_SUFFIXES):
            yield from iter_records(path, text_column)
            continue
        with open(path, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                line = line.strip()
                if line:
                    yield line


def train_wordpiece(
    files: list[str],
    *,
    vocab_size: int,
    min_frequency: int = 2,
    lowercase: bool = True,
    show_progress: bool = False,
    model_max_length: int = DEFAULT_MAX_LENGTH,
    key: str = "tokenizer.train_files",
    text_column: str = "text",
):
    """Train a BERT WordPiece tokenizer on corpus files.

    Args:
        files: plain-text files (read line by line; invalid UTF-8 bytes are replaced), JSON
            Lines or parquet files (their ``text_column``), compressed text (``.gz``, ...).
        vocab_size: target vocabulary size, special tokens included.
        min_frequency: minimum count of a pair to be merged.
        lowercase: lower-case and strip accents (an "uncased" BERT).
        model_max_length: the length ``truncation=True`` cuts at (the model's positions).
        key: the recipe key or option that named ``files``, for the error message.

    Returns:
        A transformers ``BertTokenizer`` whose vocabulary starts with
        [PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3, [MASK]=4.

    Raises:
        UserError: when the files hold no text.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers
    from tokenizers.models import WordPiece
    from tokenizers.trainers import WordPieceTrainer
    from transformers import BertTokenizer

    backend = Tokenizer(WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase, strip_accents=lowercase or None)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = WordPieceTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        continuing_subword_prefix="##",
        show_progress=show_progress,
    )
    backend.train_from_iterator(_iter_lines(files, text_column), trainer=trainer)
    vocab = backend.get_vocab()
    if len(vocab) <= len(SPECIAL_TOKENS):
        shown = f"'{files[0]}'" + (f" and {len(files) - 1} more" if len(files) > 1 else "") if files else "no files"
        raise UserError(f"{key}: no text to train a vocabulary on in {shown} (empty or blank files); "
                        f"add text to them or point {key} at other files")
    tokenizer = BertTokenizer(vocab=vocab, do_lower_case=lowercase, strip_accents=lowercase or None,
                              model_max_length=model_max_length)
    return _checked(tokenizer, "trained tokenizer")


def _checked(tokenizer, source: str):
    missing = [
        name
        for name in ("cls_token", "sep_token", "mask_token", "pad_token")
        if getattr(tokenizer, name, None) is None or getattr(tokenizer, name + "_id", None) is None
    ]
    if missing:
        raise UserError(f"{source}: not a BERT tokenizer (missing {', '.join(missing)})")
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise UserError(f"{source}: the tokenizer has only its {len(tokenizer)} special tokens, no vocabulary "
                        "(is vocab.txt or tokenizer.json missing?)")
    if "token_type_ids" not in tokenizer.model_input_names:
        tokenizer.model_input_names = list(MODEL_INPUT_NAMES)
    return tokenizer


def load_tokenizer(name_or_path: str, *, key: str = "tokenizer.name_or_path", trust_remote_code: bool = False):
    """Load a BERT tokenizer from a local folder or a Hub id.

    Raises:
        UserError: the folder/id cannot be loaded (e.g. offline and not local), or the
        tokenizer lacks BERT's special tokens.
    """
    from transformers import AutoTokenizer

    from .hub import load_local_or_hub

    tokenizer = load_local_or_hub(AutoTokenizer.from_pretrained, name_or_path, key, what="tokenizer from ",
                                  trust_remote_code=trust_remote_code)
    return _checked(tokenizer, f"{key} '{name_or_path}'")


def recipe_tokenizer(recipe, train_files: list[str] = (), *, saved: Path | None = None, show_progress: bool = False):
    """The tokenizer ``recipe`` trains with (not saved anywhere).

    Priority: the folder ``saved`` when it exists (a run's own ``output_dir/tokenizer``),
    the recipe's ``tokenizer_source()`` (``tokenizer.name_or_path``, else the checkpoint's
    own tokenizer), else a WordPiece vocabulary of ``tokenizer.vocab_size`` trained on
    ``tokenizer.train_files`` (default: ``train_files``, the data files).

    Raises:
        UserError: an unloadable tokenizer, or nothing to train a vocabulary on.
    """
    if saved is not None and saved.is_dir():
        return load_tokenizer(str(saved), key="output_dir/tokenizer")
    source = recipe.tokenizer_source()
    if source is not None:
        key, name = source
        tokenizer = load_tokenizer(name, key=key, trust_remote_code=recipe.model.trust_remote_code)
        spec = getattr(recipe, "tokenizer", None)  # pretraining's training settings, unused for a loaded one
        lowercases = getattr(tokenizer, "do_lower_case", None)
        if (spec is not None and "lowercase" in spec.model_fields_set and lowercases not in (None, spec.lowercase)
                and (name, spec.lowercase) not in _WARNED):  # the preflight loads it too: one warning
            _WARNED.add((name, spec.lowercase))
            logger.warning("tokenizer.lowercase: %s is not applied: the tokenizer of %s '%s' %s (its own setting); "
                           "train one (no %s) to choose", spec.lowercase, key, name,
                           "lower-cases" if lowercases else "keeps case", key)
        return tokenizer
    from .recipe_files import expand_files

    spec = recipe.tokenizer
    key = "tokenizer.train_files" if spec.train_files else "data.train_files"
    files = expand_files(spec.train_files, key) if spec.train_files else list(train_files)
    if not files:
        raise UserError("tokenizer.train_files: needed to train a vocabulary when data comes from data.dataset_name")
    logger.info("training a WordPiece vocabulary of %d on %d file(s)", spec.vocab_size, len(files))
    return train_wordpiece(files, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency,
                           lowercase=spec.lowercase, show_progress=show_progress,
                           model_max_length=recipe.model.config.max_position_embeddings, key=key,
                           text_column=recipe.data.text_column)


def save_tokenizer(tokenizer, directory: str | os.PathLike, model_max_length: int = DEFAULT_MAX_LENGTH) -> Path:
    """``save_pretrained`` into ``directory`` (created); a tokenizer without a real length
    limit (transformers' 1e30 placeholder) gets ``model_max_length``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if not tokenizer.model_max_length or tokenizer.model_max_length > 1_000_000:
        tokenizer.model_max_length = model_max_length
    tokenizer.save_pretrained(str(directory))
    return directory

"""``bert-recipes inspect``: dump collated training batches so a person can read exactly
what the model is trained on."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .data.loader import build_pretraining_dataloader
from .recipe import PretrainRecipe, expand_files
from .tokenizer import recipe_tokenizer


def write_batches(recipe: PretrainRecipe, num_batches: int, out: str | os.PathLike) -> int:
    """Write ``num_batches`` training batches to ``out`` as JSON lines, one example per line:
    ``batch``, ``input_ids``, ``token_type_ids``, ``attention_mask``, ``labels``,
    ``next_sentence_label`` and the decoded ``tokens``. Returns the number of examples.

    The file is written to a temporary name and renamed, so a failure never leaves a
    partial file behind.
    """
    train_files = expand_files(recipe.data.train_files, "data.train_files")
    tokenizer = recipe_tokenizer(recipe, train_files, saved=Path(recipe.output_dir) / "tokenizer")
    loader = build_pretraining_dataloader(
        recipe.data, tokenizer, train_files, batch_size=recipe.train.per_device_train_batch_size,
        seed=recipe.seed, num_workers=0,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False, encoding="utf-8") as tmp:
        for index, batch in enumerate(loader):
            if index == num_batches:
                break
            rows = {key: value.tolist() for key, value in batch.items()}
            for i, ids in enumerate(rows["input_ids"]):
                example = {"batch": index, **{key: rows[key][i] for key in rows}}
                example["tokens"] = tokenizer.convert_ids_to_tokens(ids)
                tmp.write(json.dumps(example) + "\n")
                count += 1
    os.replace(tmp.name, out)
    return count

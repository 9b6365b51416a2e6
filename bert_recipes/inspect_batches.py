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


NSP_NAMES = {0: "IsNext", 1: "RandomNext"}


def readable_example(tokenizer, ids: list[int], types: list[int], labels: list[int], nsp: int) -> str:
    """One line for a person: ``IsNext | A: ... | B: ...``; a masked position reads
    ``[MASK](original)`` (or ``shown(original)`` for the 10% random / 10% kept tokens) and
    ``##`` pieces are glued to their word. Padding and [CLS]/[SEP] are left out."""
    shown = tokenizer.convert_ids_to_tokens(ids)
    originals = tokenizer.convert_ids_to_tokens([label if label != -100 else 0 for label in labels])
    segments: dict[int, list[str]] = {0: [], 1: []}
    specials = {tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token}
    for token, original, label, segment in zip(shown, originals, labels, types):
        if label == -100 and token in specials:
            continue
        text = f"{token}({original.removeprefix('##')})" if label != -100 else token
        if text.startswith("##") and segments[segment]:
            segments[segment][-1] += text[2:]
        else:
            segments[segment].append(text)
    return f"{NSP_NAMES.get(nsp, nsp)} | A: {' '.join(segments[0])} | B: {' '.join(segments[1])}"


def write_batches(recipe: PretrainRecipe, num_batches: int, out: str | os.PathLike, *, rank: int = 0,
                  world_size: int = 1, text: bool = False) -> int:
    """Write ``num_batches`` training batches of rank ``rank`` of ``world_size`` (what that
    process trains on first) to ``out``. Returns the number of examples.

    JSON lines (default), one example per line: ``batch``, ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels``, ``next_sentence_label`` and the decoded ``tokens``; with
    ``text``, one :func:`readable_example` line per example instead.

    The file is written to a temporary name and renamed, so a failure never leaves a
    partial file behind.
    """
    train_files = expand_files(recipe.data.train_files, "data.train_files")
    tokenizer = recipe_tokenizer(recipe, train_files, saved=Path(recipe.output_dir) / "tokenizer")
    loader = build_pretraining_dataloader(
        recipe.data, tokenizer, train_files, batch_size=recipe.train.per_device_train_batch_size,
        seed=recipe.seed, num_workers=0, rank=rank, world_size=world_size,
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
                if text:
                    n = sum(rows["attention_mask"][i])
                    line = readable_example(tokenizer, ids[:n], rows["token_type_ids"][i][:n], rows["labels"][i][:n],
                                            rows["next_sentence_label"][i])
                else:
                    example = {"batch": index, **{key: rows[key][i] for key in rows}}
                    example["tokens"] = tokenizer.convert_ids_to_tokens(ids)
                    line = json.dumps(example)
                tmp.write(line + "\n")
                count += 1
    os.replace(tmp.name, out)
    return count

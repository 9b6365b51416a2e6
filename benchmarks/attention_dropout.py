"""What BERT's attention dropout costs in SDPA on this machine: one attention call, forward + backward.

    .venv/bin/python benchmarks/attention_dropout.py [--batch 4] [--heads 12] [--seq 512] [--head-dim 64]
        [--rounds 4] [--threads 1] [--device cpu|cuda] [--dtype fp32|bf16]

BERT trains with dropout 0.1 on the attention probabilities (google-research/bert,
``attention_probs_dropout_prob``). PyTorch's fused SDPA kernels on the CPU take no dropout,
so a training step falls back to the math path (scores, softmax, a Bernoulli mask, two
matmuls, all materialised at ``[B, heads, L, L]``); with dropout 0 the CPU flash kernel runs.
Alternating rounds (benchmarks/common.py) time both and ``sdpa_dropout``
(bert_recipes/attention.py: the same dropout attention in one autograd node, block by block)
on the same random q, k, v, and the Bernoulli draw alone at the scores' size against
``drop_mask``. ``--dtype bf16`` runs all three on bf16 tensors; ``--dropout 0 --dtype bf16``
measures what bf16 training without attention dropout runs (``sdpa_dropout`` keeps it: SDPA's
bf16 backward is slow on a CPU). Writes
benchmarks/out/attention_dropout[-bf16].json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import alternate, default_out, machine_info, summarise, write_json  # noqa: E402
from bert_recipes.attention import DropoutAttention  # noqa: E402
from bert_recipes.dropout import drop_mask  # noqa: E402


def kernels(q, k, v, p: float) -> list[str]:
    """The aten attention/dropout ops one forward + backward at dropout ``p`` runs."""
    with torch.profiler.profile() as prof:
        F.scaled_dot_product_attention(q, k, v, dropout_p=p).sum().backward()
    return sorted({e.key for e in prof.key_averages() if "attention" in e.key or "bernoulli" in e.key})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    q, k, v = (torch.randn(args.batch, args.heads, args.seq, args.head_dim, device=device, dtype=dtype,
                           requires_grad=True) for _ in range(3))

    def attention(p: float):
        def one_round(_round):
            F.scaled_dot_product_attention(q, k, v, dropout_p=p).sum().backward()
            return {"items": 1}
        return one_round

    def ours(_round):
        DropoutAttention.apply(q, k, v, None, args.dropout, args.head_dim**-0.5).sum().backward()
        return {"items": 1}

    ops = {"dropout": kernels(q, k, v, args.dropout), "no_dropout": kernels(q, k, v, 0.0)}
    records = alternate({"dropout": attention(args.dropout), "no_dropout": attention(0.0), "sdpa_dropout": ours},
                        args.rounds, device)
    summary = summarise(records, "no_dropout", "dropout", "calls")
    ours_summary = summarise(records, "sdpa_dropout", "dropout", "calls")
    shape = (args.batch, args.heads, args.seq, args.seq)
    draws = {"bernoulli_": lambda: torch.empty(shape, device=device).bernoulli_(1 - args.dropout),
             "drop_mask": lambda: drop_mask(shape, args.dropout, device)}
    draw_s = {}
    for name, draw in draws.items():
        start = time.perf_counter()
        for _ in range(args.rounds):
            draw()
        draw_s[name] = (time.perf_counter() - start) / args.rounds
    qkv = f"[{args.batch}, {args.heads}, {args.seq}, {args.head_dim}]"
    print(f"attention forward + backward, q/k/v {qkv}, {args.dtype}, {args.threads} thread(s):")
    print(f"  SDPA, dropout {args.dropout}: {1 / summary['dropout_calls_per_s']:.3f} s  ({', '.join(ops['dropout'])})")
    print(f"  SDPA, dropout 0:   {1 / summary['no_dropout_calls_per_s']:.3f} s  ({', '.join(ops['no_dropout'])})")
    print(f"  sdpa_dropout, dropout {args.dropout}: {1 / ours_summary['sdpa_dropout_calls_per_s']:.3f} s")
    print(f"  SDPA's dropout costs {summary['ratio_median_of_rounds']:.2f}x (rounds {summary['per_round_ratio']}); "
          f"sdpa_dropout is {ours_summary['ratio_median_of_rounds']:.2f}x SDPA at dropout {args.dropout} (rounds "
          f"{ours_summary['per_round_ratio']})")
    print(f"  the mask alone, {torch.Size(shape).numel():,} elements: bernoulli_ {draw_s['bernoulli_']:.3f} s, "
          f"drop_mask {draw_s['drop_mask']:.3f} s")
    out = args.out or default_out(f"attention_dropout{'-bf16' if args.dtype == 'bf16' else ''}.json")
    write_json(out, {"shape": qkv, "dtype": args.dtype, "dropout": args.dropout, "threads": args.threads,
                     "kernels": ops, "summary": summary, "sdpa_dropout_summary": ours_summary, "mask_s": draw_s,
                     "machine": machine_info(device)})
    print(f"  wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

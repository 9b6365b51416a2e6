"""What BERT's attention dropout costs in SDPA on this machine: one attention call, forward + backward.

    .venv/bin/python benchmarks/attention_dropout.py [--batch 4] [--heads 12] [--seq 512] [--head-dim 64]
        [--rounds 4] [--threads 1] [--device cpu|cuda]

BERT trains with dropout 0.1 on the attention probabilities (google-research/bert,
``attention_probs_dropout_prob``). PyTorch's fused SDPA kernels on the CPU take no dropout,
so a training step falls back to the math path (scores, softmax, a Bernoulli mask, two
matmuls, all materialised at ``[B, heads, L, L]``); with dropout 0 the CPU flash kernel runs.
Alternating rounds (benchmarks/common.py) time both, on the same random q, k, v, and the
Bernoulli draw alone at the scores' size. Writes benchmarks/out/attention_dropout.json.
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
    parser.add_argument("--out", default=default_out("attention_dropout.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, args.seq, args.head_dim, device=device, requires_grad=True)
               for _ in range(3))

    def attention(p: float):
        def one_round(_round):
            F.scaled_dot_product_attention(q, k, v, dropout_p=p).sum().backward()
            return {"items": 1}
        return one_round

    ops = {"dropout": kernels(q, k, v, args.dropout), "no_dropout": kernels(q, k, v, 0.0)}
    records = alternate({"dropout": attention(args.dropout), "no_dropout": attention(0.0)}, args.rounds, device)
    summary = summarise(records, "no_dropout", "dropout", "calls")
    scores = torch.empty(args.batch, args.heads, args.seq, args.seq, device=device)
    start = time.perf_counter()
    for _ in range(args.rounds):
        scores.bernoulli_(1 - args.dropout)
    bernoulli_s = (time.perf_counter() - start) / args.rounds
    shape = f"[{args.batch}, {args.heads}, {args.seq}, {args.head_dim}]"
    print(f"SDPA forward + backward, q/k/v {shape}, fp32, {args.threads} thread(s):")
    print(f"  dropout {args.dropout}: {1 / summary['dropout_calls_per_s']:.3f} s  ({', '.join(ops['dropout'])})")
    print(f"  dropout 0:   {1 / summary['no_dropout_calls_per_s']:.3f} s  ({', '.join(ops['no_dropout'])})")
    print(f"  dropout costs {summary['ratio_median_of_rounds']:.2f}x (rounds {summary['per_round_ratio']}); "
          f"the Bernoulli mask alone {bernoulli_s:.3f} s for {scores.numel():,} elements")
    write_json(args.out, {"shape": shape, "dropout": args.dropout, "threads": args.threads, "kernels": ops,
                          "summary": summary, "bernoulli_s": bernoulli_s, "machine": machine_info(device)})
    print(f"  wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

#!/usr/bin/env bash
# Issues 4 and 14 on a GPU, in one go (about 4 minutes on an H200, 2026-12-04):
#   bert-base shape, seq 128, bf16 autocast: sequences/s, MFU (peak from
#   bert_recipes/training/throughput.py: 989 TFLOP/s dense bf16 for H100 SXM / H200; goal >= 45%),
#   and the A/B ratio ours vs the stock transformers pipeline (benchmarks/pretrain_vs_stock.py),
#   once eager with padded batches (data.packing: false; "eager" = not compiled), once with
#   padding-free packed batches (--packing = data.packing: batch, the default; again through
#   flash-attn's variable-length kernel when flash_attn is installed), once packed with cuDNN's
#   SDPA backend kept (the trainer turns it off for packed batches: an A/B) and once packed with
#   train.torch_compile (ours compiled; stock never is).
#
#   benchmarks/gpu.sh                  # on the GPU machine, from anywhere in the checkout
#   SMOKE=1 benchmarks/gpu.sh          # the eager run with batch 2 and 2 steps per variant on the CPU (a test)
#   CORPUS='/data/*.txt' TOKENIZER=/dir benchmarks/gpu.sh   # text files and a tokenizer directory of your own
#                                      # (defaults: pretrain_vs_stock.py's --corpus and --tokenizer)
#
# JSON and logs go to $OUT when set, else benchmarks/out. Python: $PYTHON if set, else the
# first of .venv/bin/python, python3, python that imports torch (with CUDA unless SMOKE=1);
# missing project dependencies are installed into .venv-gpu (--system-site-packages, so the
# machine's torch is reused, never downloaded). Each run has its own timeout, so a slow step
# cannot eat the whole budget.
set -uo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
REPO=$(pwd)
OUT_DIR=${OUT:-$REPO/benchmarks/out}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu.log"
SMOKE=${SMOKE:-0}
: > "$LOG"

say() { echo "[gpu.sh $(date -u +%H:%M:%S)] $*" | tee -a "$LOG"; }

if [ "$SMOKE" = 1 ]; then
  DEVICE=cpu; NEED_CUDA=0
  BATCH=2; ROUNDS=1; STEPS=1; WARMUP=1; RUN_TIMEOUT=600
else
  DEVICE=cuda; NEED_CUDA=1
  BATCH=${BATCH:-128}; ROUNDS=${ROUNDS:-5}; STEPS=${STEPS:-8}; WARMUP=${WARMUP:-3}; RUN_TIMEOUT=${RUN_TIMEOUT:-200}
fi

has_torch() {  # $1 = python; succeeds when it imports torch (with CUDA when needed)
  "$1" - "$NEED_CUDA" <<'PY' >/dev/null 2>&1
import sys, torch
sys.exit(0 if (sys.argv[1] == "0" or torch.cuda.is_available()) else 1)
PY
}

has_deps() {
  "$1" -c "import transformers, accelerate, torchdata, tokenizers, pydantic, yaml, numpy, datasets" >/dev/null 2>&1
}

PY=""
for candidate in ${PYTHON:-} "$REPO/.venv/bin/python" "$REPO/.venv-gpu/bin/python" python3 python; do
  if command -v "$candidate" >/dev/null 2>&1 && has_torch "$candidate"; then PY=$(command -v "$candidate"); break; fi
done
if [ -z "$PY" ]; then
  say "no python with torch$([ "$NEED_CUDA" = 1 ] && echo ' + CUDA') found (set PYTHON=...)"; exit 2
fi
if ! has_deps "$PY"; then
  say "$PY lacks project dependencies: creating .venv-gpu (system site packages: reuses this torch)"
  "$PY" -m venv --system-site-packages "$REPO/.venv-gpu" >>"$LOG" 2>&1 \
    && "$REPO/.venv-gpu/bin/python" -m pip install -q -e "$REPO" >>"$LOG" 2>&1 \
    && PY="$REPO/.venv-gpu/bin/python"
  has_deps "$PY" || { say "could not install the dependencies (offline?); see $LOG"; exit 2; }
fi
say "python: $PY ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)' 2>/dev/null))"
if [ "$NEED_CUDA" = 1 ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
fi

export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
status=0
run() {  # $1 = name, rest = extra arguments of pretrain_vs_stock.py
  local name=$1; shift
  say "run $name: pretrain_vs_stock.py --device $DEVICE --precision bf16 --shapes bert-base --batch-size $BATCH $*"
  timeout --signal=TERM --kill-after=10 "$RUN_TIMEOUT" "$PY" "$REPO/benchmarks/pretrain_vs_stock.py" \
    --device "$DEVICE" --precision bf16 --shapes bert-base --batch-size "$BATCH" \
    --rounds "$ROUNDS" --steps "$STEPS" --warmup "$WARMUP" \
    ${CORPUS:+--corpus "$CORPUS"} ${TOKENIZER:+--tokenizer "$TOKENIZER"} "$@" \
    --out "$OUT_DIR/gpu_pretrain_vs_stock_$name.json" 2>&1 | grep -v -i "warn" | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { say "run $name failed or timed out (exit $rc)"; status=1; }
}

run eager    # padded batches (data.packing: false), not compiled
run packed --packing --no-optimizer-bench   # issue 14: each batch packed into rows of 128 (same instances)
if [ "$SMOKE" != 1 ]; then  # A/B: cuDNN's SDPA backend kept (plans per shape); the same as packed on a CPU
  run packed_cudnn --packing --cudnn-sdp --no-optimizer-bench
fi
if "$PY" -c "import flash_attn" >/dev/null 2>&1; then  # issue 14: packed rows through flash-attn's varlen kernel
  run packed_flash --packing --attn flash_attention_2 --no-optimizer-bench
else
  say "flash_attn is not installed: the packed_flash run (variable-length kernel) is skipped"
fi
if [ "$SMOKE" = 1 ]; then
  say "SMOKE: the compiled run is skipped (Inductor on a CPU takes minutes for bert-base)"
else
  run compiled --packing --compile --no-optimizer-bench   # the default data.packing (batch), compiled
fi

"$PY" - "$OUT_DIR" <<'PY' 2>&1 | tee -a "$LOG"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
for name in ("eager", "packed", "packed_cudnn", "packed_flash", "compiled"):
    path = out / f"gpu_pretrain_vs_stock_{name}.json"
    if not path.is_file():
        print(f"{name}: no result ({path} missing)")
        continue
    report = json.loads(path.read_text())
    r = report["shapes"]["bert-base"]
    mfu = r["ours_mfu"]
    goal = "" if mfu is None else f" (goal >= 45%: {'met' if mfu >= 0.45 else 'NOT met'})"
    print(f"{name}: {report['machine'].get('gpu', report['device'])}: batch {r['batch_size']} x seq {r['max_seq_length']} bf16: "
          f"ours {r['ours_sequences_per_s']:.1f} seq/s, MFU {'n/a' if mfu is None else f'{mfu:.1%}'}{goal}; "
          f"ratio vs stock {r['ratio_median_of_rounds']:.2f}x; first-batch fp32 loss |diff| {r['first_batch_loss']['abs_diff']:.1e}")
PY
say "done (exit $status); JSON and log in $OUT_DIR"
exit $status

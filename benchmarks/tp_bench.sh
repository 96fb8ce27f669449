#!/usr/bin/env bash
# Tensor parallelism on one machine with 2 GPUs: FullKV vs KCache (--compare) at TP=1 and TP=2, the same device
# pool per GPU (--device-cache-gb), so that the largest batch shows each mode's capacity per card.
# Usage: benchmarks/tp_bench.sh [input_len] [num_prompts]     (default 8192 64); JSON to benchmarks/results
set -euo pipefail
OUT_DIR=${OUT_DIR:-benchmarks/results}
LEN=${1:-8192}
PROMPTS=${2:-64}
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
COMMON=(--model llama-3.1-8b --load-format dummy --dtype bfloat16 --top-n 64 --max-num-batched-tokens 32768
        --max-num-seqs 32 --device-cache-gb 16 --compare --input-len "$LEN"
        --output-len "${OUTPUT_LEN:-64}" --num-prompts "$PROMPTS")
mkdir -p "$OUT_DIR"
for tp in 1 2; do
  python3 -m kcache bench "${COMMON[@]}" --tensor-parallel-size "$tp" \
    --output-json "$OUT_DIR/bench_tp${tp}_${CARD}_in${LEN}_out${OUTPUT_LEN:-64}.json"
done

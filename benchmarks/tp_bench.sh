#!/usr/bin/env bash
# Tensor parallelism on one machine: FullKV vs KCache (--compare) at each TP size, the same device pool per GPU
# (--device-cache-gb), so that the largest batch shows each mode's capacity per card.
# Usage: benchmarks/tp_bench.sh [input_len] [num_prompts]     (default 8192 64); JSON to benchmarks/results
# Env: MODEL (llama-3.1-8b; llama-3.1-70b needs TPS=4 on 80+ GB cards), TPS ("1 2"), TOP_N (64), DEVICE_GB (16),
#      OUTPUT_LEN (64), OUT_DIR. The 70B run of issue 16, on 4 GPUs:
#      MODEL=llama-3.1-70b TPS=4 DEVICE_GB=48 benchmarks/tp_bench.sh 32768 32   (then TOP_N=256 for the default)
set -euo pipefail
OUT_DIR=${OUT_DIR:-benchmarks/results}
LEN=${1:-8192}
PROMPTS=${2:-64}
MODEL=${MODEL:-llama-3.1-8b}
TOP_N=${TOP_N:-64}
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
COMMON=(--model "$MODEL" --load-format dummy --dtype bfloat16 --top-n "$TOP_N" --max-num-batched-tokens 32768
        --max-num-seqs 64 --device-cache-gb "${DEVICE_GB:-16}" --compare --input-len "$LEN"
        --output-len "${OUTPUT_LEN:-64}" --num-prompts "$PROMPTS")
mkdir -p "$OUT_DIR"
TAG=$([ "$MODEL" = llama-3.1-8b ] && echo "" || echo "_${MODEL}")
for tp in ${TPS:-1 2}; do
  python3 -m kcache bench "${COMMON[@]}" --tensor-parallel-size "$tp" \
    --output-json "$OUT_DIR/bench_tp${tp}${TAG}_${CARD}_in${LEN}_out${OUTPUT_LEN:-64}_n${TOP_N}.json"
done

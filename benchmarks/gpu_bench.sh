#!/usr/bin/env bash
# Throughput of FullKV vs KCache on one GPU: Llama-3.1-8B shapes, random weights (real 8B weights cannot
# travel to the lent machines), bf16. Results: benchmarks/results/bench_<card>_<input>.json.
# Usage: benchmarks/gpu_bench.sh [input_len ...]    (default: 16384 32768)
# Env: OUTPUT_LEN (default 128), PROMPTS (default: about twice what FullKV holds), MAX_SEQS (default 128; KCache's
# recent-V rings are sized for this many sequences), OUT_DIR.
set -euo pipefail
OUT_DIR=${OUT_DIR:-benchmarks/results}
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
COMMON=(--model llama-3.1-8b --load-format dummy --dtype bfloat16 --top-n 64
        --max-num-batched-tokens 32768 --host-cache-gb 96 --max-num-seqs "${MAX_SEQS:-128}")
mkdir -p "$OUT_DIR"
LENS=("$@")
[ ${#LENS[@]} -gt 0 ] || LENS=(16384 32768)
for len in "${LENS[@]}"; do
  prompts=${PROMPTS:-$(( 2 * 1024 * 1024 / len ))}   # about twice what FullKV holds at once on an 80 GB card
  python3 -m kcache bench "${COMMON[@]}" --compare --input-len "$len" --output-len "${OUTPUT_LEN:-128}" \
    --num-prompts "$prompts" --output-json "$OUT_DIR/bench_${CARD}_in${len}_out${OUTPUT_LEN:-128}.json"
done

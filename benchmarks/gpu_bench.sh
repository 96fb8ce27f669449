#!/usr/bin/env bash
# Throughput of FullKV vs KCache on one GPU: Llama-3.1-8B shapes, random weights (real 8B weights cannot
# travel to the lent machines), bf16. Results: benchmarks/results/bench_<card><TAG>_in<len>_out<out>[_n<N>].json.
# Usage: benchmarks/gpu_bench.sh [input_len ...]    (default: 16384 32768)
# Env: OUTPUT_LEN (default 128); PROMPTS (default: about twice what FullKV holds on an 80 GB card); TOP_NS (default
# 64: the first N runs --compare against FullKV, the others KCache alone); CHUNK (chunk_tokens of those runs, default
# the config's); TOKEN_N (also run KCache at chunk_tokens=1 with this N, for reference); DEVICE_GB (device cache
# budget, default: what the card leaves); MAX_SEQS (default 128); TAG (file-name tag, e.g. _pool48); OUT_DIR;
# KV_DTYPE (auto or fp8: --kv-cache-dtype of every run, FullKV's and KCache's; default auto); HOST_V_DTYPE (auto or
# fp8: KCache's --host-v-dtype; default auto); EXACT (--fp8-exact-channels of FP8 runs; default the engine's);
# HOST_GB (host V pool,
# default 96: FP8 K fits ~46 sequences of 32k in a 48 GiB device budget, whose bf16 V take ~97 GiB); COMPARE=0 (the
# first N runs KCache alone too: for variants of a KCache run whose FullKV has just run on the same machine).
set -euo pipefail
OUT_DIR=${OUT_DIR:-benchmarks/results}
OUTPUT_LEN=${OUTPUT_LEN:-128}
CARD=$(python3 -c "import torch; print(torch.cuda.get_device_name().split()[1].lower())")
COMMON=(--model llama-3.1-8b --load-format dummy --dtype bfloat16 --max-num-batched-tokens 32768
        --host-cache-gb "${HOST_GB:-96}" --max-num-seqs "${MAX_SEQS:-128}" --output-len "$OUTPUT_LEN"
        --kv-cache-dtype "${KV_DTYPE:-auto}")
[ -z "${DEVICE_GB:-}" ] || COMMON+=(--device-cache-gb "$DEVICE_GB")
[ -z "${EXACT:-}" ] || COMMON+=(--fp8-exact-channels "$EXACT")
KC=(--host-v-dtype "${HOST_V_DTYPE:-auto}")
[ -z "${CHUNK:-}" ] || KC+=(--chunk-tokens "$CHUNK")
read -r -a NS <<< "${TOP_NS:-64}"
mkdir -p "$OUT_DIR"
LENS=("$@")
[ ${#LENS[@]} -gt 0 ] || LENS=(16384 32768)
for len in "${LENS[@]}"; do
  prompts=${PROMPTS:-$(( 2 * 1024 * 1024 / len ))}   # about twice what FullKV holds at once on an 80 GB card
  base="$OUT_DIR/bench_${CARD}${TAG:-}_in${len}_out${OUTPUT_LEN}"
  if [ "${COMPARE:-1}" = 0 ]; then first=(--cache kcache); else first=(--compare); fi
  python3 -m kcache bench "${COMMON[@]}" "${KC[@]}" "${first[@]}" --top-n "${NS[0]}" --input-len "$len" \
    --num-prompts "$prompts" --output-json "$base.json"
  for n in "${NS[@]:1}"; do
    python3 -m kcache bench "${COMMON[@]}" "${KC[@]}" --cache kcache --top-n "$n" --input-len "$len" \
      --num-prompts "$prompts" --output-json "${base}_n${n}.json"
  done
  if [ -n "${TOKEN_N:-}" ]; then
    python3 -m kcache bench "${COMMON[@]}" --cache kcache --chunk-tokens 1 --top-n "$TOKEN_N" --input-len "$len" \
      --num-prompts "$prompts" --output-json "${base}_n${TOKEN_N}_tokens.json"
  fi
done

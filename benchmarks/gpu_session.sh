#!/usr/bin/env bash
# The next GPU session's runs in one device call (a machine goes back after 30 s idle, and starting one costs minutes
# of the session's 30): the GPU tests, the uneven-slices fault probe, then the 32k rows (FullKV in the same runs) at
# the defaults and with each set of knobs below, set through a sitecustomize, so the engine A/B needs no code change.
#   bash benchmarks/gpu_session.sh [step ...]   steps: tests probe overlap fp8v bf16 fp8 fp8hv e2e_fp8 16k 8k (default:
#   all, in order; fp8v: the step probe's FP8 K op with FP8 host V in chunks of 16 against bf16 host V in chunks of 8;
#   fp8hv: the FP8 K rows with FP8 host V in chunks of 16 (2 KiB reads); 16k and 8k: the bf16 and FP8 K rows at that
#   length, at the defaults only)
# Env: KNOBS (sets of triton_decode constants NAME=VALUE, the sets split by ';', no spaces in a value, e.g.
# "BLOCK_L=4096;OVERLAP_SHARES=(3,1)": each 32k row runs again under each set; default OVERLAP_SHARES (3, 1) and
# (5, 1)), N256=1 (every row also at N=256, the accuracy default). Logs and
# results go to $OUT/gpu_session.tgz (one file: the device returns 8 at most), packed after each step. The wheels the
# device image lacks (pydantic, pydantic_core, annotated_types, typing_inspection, gguf) go in .whl/ first (device
# README) and travel by carry. Measured on the H100 (sixth session): tests 2.5 min, probe 0.5, bf16 2 a row, FP8 3.5
# a row, e2e_fp8 5; overlap ~1-2 and 16k / 8k ~5 each (estimated). One call runs 10 minutes at most: name the steps,
# e.g. `overlap bf16`, then `fp8`, then `16k`.
set -u
OUT=${OUT:-/tmp/out}; RES=/tmp/gpu_session; mkdir -p "$OUT" "$RES"
KNOBS=${KNOBS:-OVERLAP_SHARES=(3,1);OVERLAP_SHARES=(5,1)}
STEPS=("$@"); [ ${#STEPS[@]} -gt 0 ] || STEPS=(tests probe overlap fp8v bf16 fp8 fp8hv e2e_fp8 16k 8k)
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
t0=$(date +%s)
step() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
knobs() {  # a sitecustomize setting triton_decode's constants NAME=VALUE in every python started after it
  rm -rf /tmp/knobs && mkdir -p /tmp/knobs
  { echo "from kcache.attention import triton_decode as td"
    for kv in "$@"; do echo "td.${kv%%=*} = ${kv#*=}"; done; } > /tmp/knobs/sitecustomize.py
}
IFS=';' read -r -a KNOB_SETS <<< "$KNOBS"
bench() {  # bench LOG LEN ENV...: one gpu_bench.sh run, 48 GiB device budget, chunks of 8, 64 new tokens unless ENV says
  local log=$1 len=$2; shift 2
  env OUT_DIR="$RES" CHUNK=8 DEVICE_GB=48 OUTPUT_LEN=64 "$@" bash benchmarks/gpu_bench.sh "$len" > "$RES/$log.log" 2>&1
}
rows() {  # rows TAG ENV...: the 32k row at the defaults, then KCache alone under each knob set i (file tag _knobs<i>;
  # its FullKV is the defaults row's, the same machine a few minutes before)
  local tag=$1; shift
  bench "bench$tag" 32768 "$@" TAG="$tag"
  echo "defaults"; grep -E "^metric|full_batch_decode_tokens" "$RES/bench$tag.log"
  for i in "${!KNOB_SETS[@]}"; do
    knobs ${KNOB_SETS[$i]}
    bench "bench${tag}_knobs$i" 32768 "$@" TAG="${tag}_knobs$i" COMPARE=0 PYTHONPATH="/tmp/knobs:$PYTHONPATH"
    echo "${KNOB_SETS[$i]}"; grep -E "full_batch_decode_tokens" "$RES/bench${tag}_knobs$i.log"
  done
}
for s in "${STEPS[@]}"; do
  step "$s"
  case $s in
    tests) timeout 300 python3 -m pytest -q -m gpu -n 8 -p no:cacheprovider tests/test_triton.py tests/test_fp8.py \
             tests/test_engine.py > "$RES/tests.log" 2>&1; tail -4 "$RES/tests.log" ;;
    probe) for table in tile regs; do
             CUDA_LAUNCH_BLOCKING=1 timeout 120 python3 benchmarks/slices_fault_probe.py shares "$table" 2>&1 | tail -2
           done | tee "$RES/probe.log" ;;
    bf16) rows _pool48_chunk8 MAX_SEQS=128 PROMPTS=23 TOP_NS="64${N256:+ 256}" ;;
    fp8) rows _pool48_fp8 MAX_SEQS=48 PROMPTS=46 KV_DTYPE=fp8 TOP_NS="64${N256:+ 256}" ;;
    fp8hv) rows _pool48_fp8_hostv8_chunk16 MAX_SEQS=48 PROMPTS=46 KV_DTYPE=fp8 HOST_V_DTYPE=fp8 CHUNK=16 HOST_GB=52 \
             TOP_NS="64${N256:+ 256}" ;;
    overlap) OUT=$RES timeout 300 python3 benchmarks/kcache_step_probe.py 23 32768 overlap > "$RES/overlap.log" 2>&1
             tail -25 "$RES/overlap.log" ;;
    fp8v) OUT=$RES timeout 400 python3 benchmarks/kcache_step_probe.py 45 32768 fp8v > "$RES/fp8v.log" 2>&1
          tail -14 "$RES/fp8v.log" ;;
    16k|8k) len=$(( ${s%k} * 1024 )); p=$(( 23 * 32768 / len ))  # KCache bf16's batch; FP8 K's is twice that
            for kv in auto fp8; do
              if [ $kv = fp8 ]; then n=$(( 2 * p )) tag=_pool48_fp8; else n=$p tag=_pool48_chunk8; fi
              bench "bench_${kv}_$s" $len KV_DTYPE=$kv MAX_SEQS=$(( n + 4 )) PROMPTS=$n TOP_NS="64${N256:+ 256}" TAG=$tag
              echo "$kv"; grep -E "full_batch_decode_tokens|max_concurrent" "$RES/bench_${kv}_$s.log"
            done ;;
    e2e_fp8) bench e2e_fp8 32768 KV_DTYPE=fp8 MAX_SEQS=48 PROMPTS=44 TAG=_pool48_fp8_p44 OUTPUT_LEN=1024
             grep -E "^metric|^output_tokens_per_s|full_batch_decode_tokens|^elapsed" "$RES/e2e_fp8.log" ;;
    *) echo "unknown step $s" >&2; exit 2 ;;
  esac
  tar czf "$OUT/gpu_session.tgz" -C "$RES" .
done
step done

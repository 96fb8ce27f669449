"""Decode attention alone: FullKV (K and V in HBM) vs KCache (K in HBM, top-N V rows read from pinned host RAM).

Llama-3.1-8B attention shapes (32 query heads, 8 KV heads, head dim 128, bf16), one layer, block size 16,
every sequence at the full context. Each row is timed as CUDA-graph replays of R calls over R disjoint sets of
sequences (so small cases do not run out of L2), median per call. The floor of a row is its HBM bytes over the
measured HBM read bandwidth plus its host bytes over the measured zero-copy gather bandwidth.

    python benchmarks/attention_microbench.py            # table on stdout, JSON to $OUT (or benchmarks/results)
    python benchmarks/attention_microbench.py --sweep    # first pick the selection's chunk length and warps
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics

import torch
import triton
import triton.language as tl

from kcache.attention import triton_decode as td
from kcache.config import KCacheConfig

HQ, HKV, D, BS = 32, 8, 128, 16
BATCHES, CONTEXTS, TOP_NS = (1, 16, 64), (4096, 16384, 32768), (32, 64, 128)
POOL_TOKENS = max(BATCHES) * max(CONTEXTS)
ROW = D * 2  # bytes of one K or V row of one KV head


def time_graph(fn, calls: int, replays: int = 15) -> float:
    """Median seconds of one fn() call, from replays of a graph holding `calls` calls."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / calls


@triton.jit
def _read_kernel(x, out, per_prog, BLOCK: tl.constexpr):
    base = tl.program_id(0).to(tl.int64) * per_prog
    acc = tl.zeros([BLOCK], tl.float32)
    for i in range(0, per_prog, BLOCK):
        acc += tl.load(x + base + i + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out + tl.program_id(0), tl.sum(acc))


@triton.jit
def _gather_kernel(src, idx, out, ROW: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    e = tl.arange(0, ROW)
    rows = tl.load(idx + r).to(tl.int64)
    tl.store(out + r[:, None] * ROW + e[None, :], tl.load(src + rows[:, None] * ROW + e[None, :]))


def hbm_read_bandwidth() -> float:
    """Bytes/s of a streaming read of 2 GiB (what the K scan does)."""
    x = torch.randn(2**30, device="cuda", dtype=torch.bfloat16)
    progs = 1024
    out = torch.empty(progs, device="cuda")
    t = time_graph(lambda: _read_kernel[(progs,)](x, out, x.numel() // progs, BLOCK=4096), 1)
    return x.numel() * 2 / t


def gather_bandwidth(v_host: torch.Tensor) -> float:
    """Bytes/s of a zero-copy gather of 2**18 random 256-byte rows spread over all of v_host (what the V read
    does). It falls as the span grows (GPU address translation of host pages): measure it on the real pool."""
    rows = v_host.numel() // D
    n = 2**18
    idx = torch.randint(0, rows, (n,), device="cuda", dtype=torch.int32)
    out = torch.empty(n, D, device="cuda", dtype=v_host.dtype)
    t = time_graph(lambda: _gather_kernel[(n // 32,)](v_host, idx, out, ROW=D, BR=32), 1)
    assert torch.equal(out.cpu(), v_host.view(-1, D)[idx.cpu().long()])
    return n * ROW / t


def make_pools():
    """K and V pools on the GPU, and V in registered host memory (cudaHostRegister: exact size, no rounding)."""
    shape = (POOL_TOKENS // BS, HKV, BS, D)
    k = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    v_host = torch.empty(shape, dtype=torch.bfloat16)
    torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(v_host.data_ptr(), v_host.numel() * 2, 0))
    v_host.copy_(v)
    return k, v, v_host


def make_inputs(batch: int, context: int, sets: int, gen: torch.Generator):
    """`sets` disjoint batches of sequences with scattered blocks: list of (q, block_tables, lengths)."""
    blocks = context // BS
    perm = torch.randperm(POOL_TOKENS // BS, generator=gen)[: sets * batch * blocks]
    tables = perm.view(sets, batch, blocks).int().cuda()
    lengths = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    return [(torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16), tables[i], lengths) for i in range(sets)]


def bench_case(batch, context, pools, bw, gen):
    """Rows of the table for one (batch, context)."""
    k, v, v_host = pools
    sets = max(1, min(16, POOL_TOKENS // (batch * context)))
    inputs = make_inputs(batch, context, sets, gen)
    k_bytes = batch * context * HKV * ROW
    rows = []

    def calls(op):
        return lambda: [op(*x) for x in inputs]

    t = time_graph(calls(lambda q, bt, ln: td.full_decode(q, k, v, bt, ln)), sets)
    rows.append(dict(method="full", batch=batch, context=context, top_n=None, ms=t * 1e3,
                     floor_ms=2 * k_bytes / bw["hbm"] * 1e3))
    for n in TOP_NS:
        cfg = KCacheConfig(top_n=n)
        t = time_graph(calls(lambda q, bt, ln: td.kcache_decode(q, k, v_host, bt, ln, cfg)), sets)
        v_bytes = batch * HKV * n * ROW
        row = dict(method="kcache", batch=batch, context=context, top_n=n, ms=t * 1e3,
                   floor_ms=(k_bytes / bw["hbm"] + v_bytes / bw["gather"]) * 1e3)
        if n == 64:
            row["stages_ms"] = stage_times(inputs, k, v_host, cfg, sets)
        rows.append(row)
    for r in rows:
        r["fraction_of_floor"] = r["floor_ms"] / r["ms"]
    return rows


def stage_times(inputs, k, v_host, cfg, sets):
    """The KCache stages timed one at a time (ms per call): scores, select (rank + top-N merges), gather."""
    scale = D**-0.5
    mid = []
    for q, bt, ln in inputs:
        lse, m, l = td.chunk_scores(q, k, bt, ln, cfg.chunk_tokens, scale)
        mid.append((q, bt, ln, lse, m, l, td.select_chunks(lse, m, l, ln, cfg)))
    stages = {
        "scores": lambda q, bt, ln, *_: td.chunk_scores(q, k, bt, ln, cfg.chunk_tokens, scale),
        "select": lambda q, bt, ln, lse, m, l, keys: td.select_chunks(lse, m, l, ln, cfg),
        "gather": lambda q, bt, ln, lse, m, l, keys: td.gather_chunks(keys, q, k, m, l, v_host, bt, ln, cfg, scale),
    }
    return {name: time_graph(lambda: [fn(*x) for x in mid], sets) * 1e3 for name, fn in stages.items()}


def sweep(pools, gen):
    """Try the selection's chunk length and warps on a small and a large batch; keep the best (printed)."""
    k = pools[0]
    cfg = KCacheConfig(top_n=64)
    cases = []
    for batch, context in ((1, 32768), (64, 32768)):
        q, bt, ln = make_inputs(batch, context, 1, gen)[0]
        cases.append((batch, ln, td.chunk_scores(q, k, bt, ln, cfg.chunk_tokens, D**-0.5)))
    best = {}
    for block_l in (1024, 2048):
        for warps in (2, 4, 8):
            td.BLOCK_L, td.RANK_WARPS = block_l, warps
            times = [time_graph(lambda: td.select_chunks(*mid, ln, cfg), 1) for _, ln, mid in cases]
            best[block_l, warps] = times
            print(f"sweep select BLOCK_L={block_l} warps={warps}: "
                  + "  ".join(f"B={b} {t*1e3:.3f} ms" for (b, _, _), t in zip(cases, times)), flush=True)
    low = [min(t[i] for t in best.values()) for i in range(len(cases))]
    td.BLOCK_L, td.RANK_WARPS = min(best, key=lambda s: sum(t / m for t, m in zip(best[s], low)))
    print(f"sweep chose BLOCK_L={td.BLOCK_L} RANK_WARPS={td.RANK_WARPS}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", action="store_true")
    args = parser.parse_args()
    name = torch.cuda.get_device_name()
    card = name.lower().replace("nvidia", "").strip().replace(" ", "-")
    gen = torch.Generator().manual_seed(0)
    pools = make_pools()
    bw = {"hbm": hbm_read_bandwidth(), "gather": gather_bandwidth(pools[2]),
          "gather_256MiB": gather_bandwidth(pools[2].view(-1)[: 2**27])}
    print(f"{name}: HBM read {bw['hbm']/1e9:.0f} GB/s, zero-copy gather of random 256 B rows from the "
          f"{pools[2].numel() * 2 / 2**30:.0f} GiB pool {bw['gather']/1e9:.1f} GB/s "
          f"(from its first 256 MiB: {bw['gather_256MiB']/1e9:.1f} GB/s)", flush=True)
    if args.sweep:
        sweep(pools, gen)
    rows = []
    for batch in BATCHES:
        for context in CONTEXTS:
            rows += bench_case(batch, context, pools, bw, gen)
            print(f"done B={batch} L={context}", flush=True)
    full = {(r["batch"], r["context"]): r["ms"] for r in rows if r["method"] == "full"}
    print(f"\n{'method':8s} {'B':>3s} {'ctx':>6s} {'N':>4s} {'ms':>8s} {'floor':>8s} {'frac':>5s} {'vs full':>7s}  stages ms")
    for r in rows:
        stages = " ".join(f"{k}={v:.3f}" for k, v in r.get("stages_ms", {}).items())
        print(f"{r['method']:8s} {r['batch']:3d} {r['context']:6d} {r['top_n'] or '':>4} {r['ms']:8.3f} "
              f"{r['floor_ms']:8.3f} {r['fraction_of_floor']:5.2f} {full[r['batch'], r['context']] / r['ms']:7.2f}  {stages}")
    result = dict(
        card=name, torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        shapes=dict(query_heads=HQ, kv_heads=HKV, head_dim=D, block_size=BS, dtype="bfloat16"),
        hbm_read_GBps=bw["hbm"] / 1e9, zero_copy_gather_GBps=bw["gather"] / 1e9,
        zero_copy_gather_first_256MiB_GBps=bw["gather_256MiB"] / 1e9, host_pool_GiB=pools[2].numel() * 2 / 2**30,
        settings={c: getattr(td, c) for c in
                  ("SCAN_TILE", "FULL_TILE", "PROGRAMS_PER_SM", "MAX_SPLITS", "BLOCK_L", "RANK_WARPS", "MERGE_KEYS",
                   "GATHER_ROWS", "GATHER_WARPS", "SPLIT_WEIGHTS")},
        rows=rows,
    )
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    path = os.path.join(out_dir, f"attention_microbench_{card}.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()

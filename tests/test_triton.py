"""Triton decode kernels against the float64 torch reference (needs CUDA and Triton; skipped elsewhere).

Every check draws fresh inputs, and poisons the allocator's free memory with NaN first, so an output (or a
workspace entry) that a kernel forgets to write shows up as NaN instead of as a stale value.
"""
import math

import pytest
import torch

pytest.importorskip("triton")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
pytestmark = pytest.mark.gpu

from kcache.attention import reference as ref  # noqa: E402
from kcache.attention import triton_decode as td  # noqa: E402
from kcache.config import KCacheConfig  # noqa: E402

HKV, G, D, BS = 8, 4, 128, 16  # Llama-3.1-8B attention shapes, the engine's block size
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
_seed = iter(range(10**6))


def _poison():
    """Fill the caching allocator's free blocks (small and large pools) with NaN."""
    held = [torch.full((1 << 18,), float("nan"), device="cuda") for _ in range(64)]  # 1 MiB each: small pool
    held.append(torch.full((1 << 26,), float("nan"), device="cuda"))  # 256 MiB: large pool
    del held


def _rel(out, want):
    return ((out.double().cpu() - want.double()).norm() / want.double().norm()).item()


def _scattered_tables(lengths, bs, spare_blocks, gen):
    """Block tables [B, widest + spare_blocks] int32 over a random permutation of a pool of nb blocks (4 unused);
    unused entries are -1. Returns (tables, nb)."""
    need = [math.ceil(n / bs) for n in lengths]
    nb = sum(need) + 4
    perm = torch.randperm(nb, generator=gen)
    tables = torch.full((len(lengths), max(need) + spare_blocks), -1, dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = perm[used:used + n].int()
        used += n
    return tables, nb


def _case(lengths, dtype, v_home="pin", spare_blocks=3):
    """Random paged cache with scattered blocks: (q, k_cache, v_cache, block_tables, lengths), k on the GPU.

    v_home: "pin" (pinned host), "register" (cudaHostRegister-ed host) or "cuda". Unused table entries are -1.
    """
    gen = torch.Generator().manual_seed(next(_seed))
    tables, nb = _scattered_tables(lengths, BS, spare_blocks, gen)
    k = torch.randn(nb, HKV, BS, D, generator=gen).to(dtype)
    v = torch.randn(nb, HKV, BS, D, generator=gen).to(dtype)
    q = (2 * torch.randn(len(lengths), HKV * G, D, generator=gen)).to(dtype)  # x2: peakier softmax
    if v_home == "pin":
        v = v.pin_memory()
    elif v_home == "register":
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(v.data_ptr(), v.numel() * v.element_size(), 0))
    else:
        v = v.cuda()
    lens = torch.tensor(lengths, dtype=torch.int32)
    return q.cuda(), k.cuda(), v, tables.cuda(), lens.cuda()


def _reference(fn, q, k, v, tables, lengths, *args):
    """The reference on the CPU in float64, on the same (rounded) inputs."""
    cpu = lambda t: t.detach().cpu().double()  # noqa: E731
    return fn(cpu(q), cpu(k), cpu(v), tables.cpu(), lengths.cpu(), *args)


RAGGED = [1, 17, 700, 1500]  # spans one and many tiles, several splits, a one-token sequence


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("lengths", [RAGGED, [4096, 33]])
def test_full_decode_matches_reference(dtype, lengths):
    q, k, v, tables, lens = _case(lengths, dtype, v_home="cuda")
    _poison()
    out = td.full_decode(q, k, v, tables, lens)
    assert out.shape == q.shape and out.dtype == dtype and out.isfinite().all()
    assert _rel(out, _reference(ref.full_decode, q, k, v, tables, lens)) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("sink,recent", [(0, 0), (4, 8)])
@pytest.mark.parametrize("chunk", [1, 8, 16])
def test_kcache_decode_matches_reference(dtype, selection, renormalize, sink, recent, chunk):
    cfg = KCacheConfig(top_n=64, selection=selection, renormalize=renormalize, sink_tokens=sink, recent_tokens=recent,
                       chunk_tokens=chunk)
    q, k, v, tables, lens = _case(RAGGED, dtype)
    _poison()
    out, mass, *_ = td.kcache_decode(q, k, v, tables, lens, cfg)
    want, want_mass, _ = _reference(ref.kcache_decode, q, k, v, tables, lens, cfg)
    assert out.shape == q.shape and out.dtype == dtype and out.isfinite().all()
    assert mass.shape == q.shape[:2] and mass.dtype == torch.float32 and mass.isfinite().all()
    assert _rel(out, want) < TOL[dtype]
    assert _rel(mass, want_mass) < 1e-5


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("chunk", [1, 8])
def test_kcache_decode_long_context(selection, chunk):
    """40k tokens: 40 (chunk 1) or 5 (chunk 8) rank programs, so the top-N merge runs two levels or one."""
    cfg = KCacheConfig(top_n=120, selection=selection, sink_tokens=4, recent_tokens=4, chunk_tokens=chunk)
    q, k, v, tables, lens = _case([40000, 3000], torch.bfloat16)
    _poison()
    out, mass, *_ = td.kcache_decode(q, k, v, tables, lens, cfg)
    want, want_mass, _ = _reference(ref.kcache_decode, q, k, v, tables, lens, cfg)
    assert _rel(out, want) < TOL[torch.bfloat16]
    assert _rel(mass, want_mass) < 1e-5


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("chunk", [1, 4, 16])
def test_top_n_covering_the_length_is_full_attention(selection, chunk):
    q, k, v, tables, lens = _case([300, 5, 129], torch.float32)
    _poison()
    cfg = KCacheConfig(top_n=300, selection=selection, chunk_tokens=chunk)
    out, mass, *_ = td.kcache_decode(q, k, v, tables, lens, cfg)
    assert _rel(out, _reference(ref.full_decode, q, k, v, tables, lens)) < 1e-5
    assert torch.allclose(mass, torch.ones_like(mass), atol=1e-5)


@pytest.mark.parametrize("table_in_registers", [False, True])
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("g,bs,chunk", [(1, 16, 1), (3, 16, 1), (3, 16, 16), (4, 16, 1), (4, 16, 2), (4, 16, 8),
                                        (4, 4, 4), (4, 2, 2), (8, 16, 4), (16, 16, 1)])
def test_the_scan_gives_the_float64_chunk_and_split_scores(monkeypatch, g, bs, chunk, fp8, table_in_registers):
    """Every group size (padded to a dot's 16 rows), block size and chunk, with float32 K or e4m3 K against bf16
    queries, each tile's blocks looked up in the table or gathered from the split's loaded once: float64's chunk
    log-sum-exps, and split stats that combine into the total."""
    from kcache.attention.reference import quantize, dequantize

    monkeypatch.setattr(td, "SCAN_TABLE_IN_REGISTERS", table_in_registers)
    gen = torch.Generator().manual_seed(next(_seed))
    hkv, d, lengths = 2, 64, [1, 37, 300, 2100]
    table, nb = _scattered_tables(lengths, bs, 1, gen)
    k = torch.randn(nb, hkv, bs, d, generator=gen)
    q = 2 * torch.randn(len(lengths), hkv * g, d, generator=gen)
    if fp8:  # bf16 queries against e4m3 K under per-head scales: the scan's tensor-core path
        scales = k.abs().amax(dim=(0, 2, 3)).div(448).view(hkv, 1)
        k8 = quantize(k.transpose(1, 2), scales).transpose(1, 2).contiguous()
        k = dequantize(k8.transpose(1, 2), scales, torch.float64).transpose(1, 2)
        q = q.bfloat16()
        args = dict(k_cache=k8.cuda(), k_scales=scales.cuda())
    else:
        args = dict(k_cache=k.cuda())
    lens = torch.tensor(lengths, dtype=torch.int32)
    _poison()
    lse, m, l = td.chunk_scores(q.cuda(), block_tables=table.cuda(), lengths=lens.cuda(), chunk_tokens=chunk,
                                scale=1 / math.sqrt(d), **args)
    slots, _ = ref.token_slots(table, lens, bs)
    keys = ref.rows_at(k.double(), slots).transpose(1, 2)  # [B, Hkv, L, D]
    logits = q.double().view(len(lengths), hkv, g, d) @ keys.transpose(-1, -2) / math.sqrt(d)  # [B, Hkv, G, L]
    for b, n in enumerate(lengths):
        x = logits[b, ..., :n]
        want = torch.nn.functional.pad(x, (0, -n % chunk), value=-math.inf).unflatten(-1, (-1, chunk)).logsumexp(-1)
        got = lse[b, ..., :want.shape[-1]].cpu().double()
        assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
        total = (m[b] + l[b].log()).cpu().double().logsumexp(-1)  # splits with no token hold m = -inf, l = 0
        assert torch.allclose(total, x.logsumexp(-1), atol=1e-4)


@pytest.mark.parametrize("stages", [3, 4])
@pytest.mark.parametrize("batch", [15, 8, 23])
def test_the_scan_with_the_table_in_registers_where_tiles_computed_ahead_pass_the_table(monkeypatch, batch, stages):
    """32k tokens on 132 SMs (an H100's or H200's split arithmetic): at batch 15 a split holds 120 blocks of a 128-entry
    table, and the pipeliner computes the addresses of the SCAN_STAGES - 1 tiles past a split's end too (up to entry
    143 at 4 stages); uneven batch slices that ran this faulted before the index wrapped. The scores equal those of
    the scan that looks each tile up in the table, at 3 and 4 stages."""
    monkeypatch.setattr(td, "_num_sms", lambda device: 132)
    monkeypatch.setattr(td, "SCAN_STAGES", stages)
    gen = torch.Generator(device="cuda").manual_seed(next(_seed))  # drawn on the GPU: 1.5 GiB of K at batch 23
    n, cuda = 32768, dict(device="cuda", generator=gen)
    k = torch.randn(batch * n // BS, HKV, BS, D, dtype=torch.bfloat16, **cuda)
    tables = torch.randperm(batch * n // BS, **cuda).int().view(batch, -1)
    q = 2 * torch.randn(batch, HKV * G, D, dtype=torch.bfloat16, **cuda)
    lens = torch.tensor([n - 3 * b for b in range(batch)], dtype=torch.int32, device="cuda")  # ragged ends
    scores = {}
    for in_registers in (False, True):
        monkeypatch.setattr(td, "SCAN_TABLE_IN_REGISTERS", in_registers)
        scores[in_registers] = td.chunk_scores(q, k, tables, lens, 8, D ** -0.5)
        torch.cuda.synchronize()
    (lse0, m0, l0), (lse1, m1, l1) = scores[False], scores[True]
    for b, length in enumerate(lens.tolist()):  # chunk scores are written up to each length
        chunks = -(-length // 8)
        assert torch.allclose(lse0[b, ..., :chunks], lse1[b, ..., :chunks], atol=1e-5)
    assert torch.allclose(m0, m1, atol=1e-5) and torch.allclose(l0, l1, rtol=1e-5)


@pytest.mark.parametrize("v_home", ["pin", "register"])
def test_reads_the_host_pool_in_place(v_home):
    q, k, v, tables, lens = _case([500, 200], torch.bfloat16, v_home=v_home)
    assert v.device.type == "cpu" and v.is_pinned()
    # Make token 123 of sequence 0 dominate KV head 0, so it is surely selected.
    block, offset = int(tables[0, 123 // BS]), 123 % BS
    k[block, 0, offset] = (q[0, :G].float().mean(0) * 4).to(k.dtype)
    cfg = KCacheConfig(top_n=16)
    before, _, *_ = td.kcache_decode(q, k, v, tables, lens, cfg)
    torch.cuda.synchronize()  # the kernel reads the host row when it runs, not when it is launched
    v[block, 0, offset] += 10.0  # a host write, after the pool was handed to the kernel
    after, _, *_ = td.kcache_decode(q, k, v, tables, lens, cfg)
    torch.cuda.synchronize()
    assert (after[0, :G] - before[0, :G]).float().abs().min() > 1.0  # the new row was read
    assert torch.equal(after[1], before[1])
    assert _rel(after, _reference(ref.kcache_decode, q, k, v, tables, lens, cfg)[0]) < TOL[torch.bfloat16]
    if v_home == "register":
        torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(v.data_ptr()))


def test_cuda_graph_replay_matches_eager():
    q, k, v, tables, lens = _case([900, 40, 333], torch.bfloat16)
    v_dev = v.cuda()
    cfg = KCacheConfig(top_n=32, sink_tokens=2, recent_tokens=4)
    run = lambda: (td.full_decode(q, k, v_dev, tables, lens), *td.kcache_decode(q, k, v, tables, lens, cfg))  # noqa: E731
    run()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run()
    q.copy_(torch.randn_like(q))
    lens.copy_(torch.tensor([500, 40, 300], dtype=torch.int32))  # new lengths: nothing depended on the old
    graph.replay()
    for got, want in zip(outs, run()):
        assert torch.equal(got, want)


@pytest.mark.parametrize("selection", ["group", "head"])
@pytest.mark.parametrize("shares,programs", [((1, 1), 0), ((1, 1, 1), 0), ((1, 1), 5), ((1,), 3), ((3, 1), 32),
                                             ((8, 1), 32)])
def test_overlapped_slices_decode_like_the_reference_eager_and_in_a_graph(monkeypatch, selection, shares, programs):
    """The batch in slices of these shares, each slice's host copy on a side stream beside the next slice's scan, the
    copy on one program per piece or on a few looping ones: the reference's outputs, masses and V rows read (written
    into the buffers given, the rows added to what they held), and a captured graph replays what eager runs
    compute."""
    monkeypatch.setattr(td, "OVERLAP_SHARES", shares)
    monkeypatch.setattr(td, "STAGE_PROGRAMS", programs)
    cfg = KCacheConfig(top_n=64, selection=selection, sink_tokens=4, recent_tokens=8)
    q, k, v, tables, lens = _case(RAGGED, torch.bfloat16)
    _poison()
    mass_out = torch.full((q.shape[0], q.shape[1]), float("nan"), device="cuda")
    rows_out = torch.full((q.shape[0],), 7, dtype=torch.int32, device="cuda")
    out, mass, rows = td.kcache_decode(q, k, v, tables, lens, cfg, mass_out=mass_out, rows_out=rows_out)
    want, want_mass, want_rows = _reference(ref.kcache_decode, q, k, v, tables, lens, cfg)
    assert mass is mass_out and rows is rows_out
    assert _rel(out, want) < TOL[torch.bfloat16] and _rel(mass, want_mass) < 1e-5
    assert torch.equal(rows.cpu(), want_rows + 7)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = td.kcache_decode(q, k, v, tables, lens, cfg)
    q.copy_(torch.randn_like(q))
    graph.replay()
    for got, eager in zip(captured, td.kcache_decode(q, k, v, tables, lens, cfg)):
        assert torch.equal(got, eager)


def test_store_rows_writes_the_host_pool():
    pool = torch.randn(10, HKV, BS, D).to(torch.bfloat16).pin_memory()
    want = pool.clone()
    slots = torch.tensor([3, 150, 17, 42, 159], dtype=torch.int32)
    rows = torch.randn(len(slots), HKV, D).to(torch.bfloat16)
    ref.store_rows(want, rows, slots.long())
    td.store_rows(pool, rows.cuda(), slots.cuda())
    torch.cuda.synchronize()
    assert torch.equal(pool, want)


def test_load_rows_reads_the_host_pool():
    from kcache.cache.kv import host_empty

    for pool in (torch.randn(10, HKV, BS, D).to(torch.bfloat16).pin_memory(),
                 host_empty((10, 3, BS, 64), torch.float32, torch.device("cuda"))):  # SmolLM2's 3 x 64: not a power of two
        pool.copy_(torch.randn(pool.shape))
        slots = torch.tensor([3, 150, 17, 42, 159, 17], dtype=torch.long)
        got = td.load_rows(pool, slots.cuda())
        assert got.is_cuda and torch.equal(got.cpu(), ref.rows_at(pool, slots))
        if pool.dtype == torch.float32:
            torch.cuda.synchronize()
            torch.cuda.cudart().cudaHostUnregister(pool.data_ptr())


def test_chunked_prefill_reads_earlier_v_from_the_host_pool():
    """A prompt prefilled in three chunks through a KCache on the GPU: each chunk's attention over the earlier
    chunks reads their V back from the host pool; the outputs equal exact attention over the whole prompt."""
    from kcache.cache.kv import KCache, StepBatch
    from kcache.models.config import ModelConfig

    torch.manual_seed(next(_seed))
    cfg = ModelConfig("llama", 100, HKV * G * D, 1, 1, HKV * G, HKV, D, 4096)
    cache = KCache(cfg, 40, BS, torch.float32, torch.device("cuda"), KCacheConfig())
    q, k, v = (torch.randn(300, h, D, device="cuda") for h in (HKV * G, HKV, HKV))
    table = torch.randperm(40, device="cuda")[:19].to(torch.int32)[None]  # scattered blocks
    slots = (table[0].long()[:, None] * BS + torch.arange(BS, device="cuda")).flatten()[:300]
    _poison()
    outs = []
    for start, end in ((0, 100), (100, 237), (237, 300)):
        batch = StepBatch(is_prefill=True, slot_mapping=slots[start:end], block_tables=table,
                          lengths=torch.tensor([end], dtype=torch.int32, device="cuda"),
                          chunk_starts=(0,), chunk_lens=(end - start,), context_lens=(start,))
        outs.append(cache.attend(0, q[start:end], k[start:end], v[start:end], batch))
    want = ref.prefill_attention(q.double(), k.double(), v.double(), 0)
    assert _rel(torch.cat(outs), want.cpu()) < TOL[torch.float32]
    cache.close()


def test_teacher_forced_rows_run_the_decode_kernel():
    """Teacher-forced scoring on the GPU runs the decode kernels with the sequence's table repeated per row, so the
    evaluation measures the kernel the engine decodes with; each row equals a decode step of its own length in the
    float64 reference."""
    from kcache.cache.kv import KCache, StepBatch
    from kcache.models.config import ModelConfig

    torch.manual_seed(next(_seed))
    cfg = ModelConfig("llama", 100, HKV * G * D, 1, 1, HKV * G, HKV, D, 4096)
    kcfg = KCacheConfig(top_n=64, chunk_tokens=8)
    cache = KCache(cfg, 40, BS, torch.float32, torch.device("cuda"), kcfg)
    L, T = 300, 20
    table = torch.randperm(40, device="cuda")[:19].to(torch.int32)[None]  # scattered blocks
    slots = (table[0].long()[:, None] * BS + torch.arange(BS, device="cuda")).flatten()[:L]
    k, v = (torch.randn(L, HKV, D, device="cuda") for _ in range(2))
    cache.ops.store_rows(cache.k[0], k, slots)
    cache.ops.store_rows(cache.v_host[0], v, slots)
    q = torch.randn(T, HKV * G, D, device="cuda")
    lens = torch.arange(L - T + 1, L + 1, dtype=torch.int32, device="cuda")  # row j sees the first L - T + 1 + j tokens
    batch = StepBatch(is_prefill=False, slot_mapping=slots[L - T:], block_tables=table, lengths=lens, shared_table=True)
    cache.plan(T)
    _poison()
    out = cache.attend(0, q, k[L - T:], v[L - T:], batch)
    torch.cuda.synchronize()
    tables = table.cpu().expand(T, -1).contiguous()
    want = ref.kcache_decode(q.cpu().double(), cache.k[0].cpu().double(), cache.v_host[0].double(), tables, lens.cpu(),
                             kcfg)[0]
    assert _rel(out, want) < TOL[torch.float32]
    assert cache.decode_stats(T).v_bytes.min() > 0
    cache.close()

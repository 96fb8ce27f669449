"""FP8 pools (`kv_cache_dtype="fp8"`): the quantisation, the reference's decode over FP8 pools against float64 math
on the dequantised values, the caches' storage and sizing, the clear errors, and the Triton kernels under the
Triton interpreter (`TRITON_INTERPRET=1`, CPU tensors; skipped otherwise, and run on a GPU by the same tests).
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from kcache.attention import reference as ref
from kcache.cache import kv
from kcache.config import EngineConfig, KCacheConfig
from kcache.models.config import ModelConfig

E4M3_HALF_ULP = 2.0 ** -4  # e4m3 keeps 3 mantissa bits: round to nearest errs by at most 2^-4 of the value
E4M3_SUBNORMAL_STEP = 2.0 ** -9  # below 2^-6 e4m3 is evenly spaced by 2^-9


def _pools(nb, Hkv, bs, D, seed):
    g = torch.Generator().manual_seed(seed)
    # rows of different magnitudes, as K is across tokens, and heads of different ranges
    size = torch.exp(0.7 * torch.randn(nb, 1, bs, 1, generator=g)) * torch.exp(torch.randn(1, Hkv, 1, 1, generator=g))
    return torch.randn(nb, Hkv, bs, D, generator=g) * size, torch.randn(nb, Hkv, bs, D, generator=g) * size


def _head_scales(pool):
    """The scales [Hkv, 1] a calibration over the whole pool [nb, Hkv, bs, D] would set."""
    return ref.fp8_scales(pool.abs().amax((0, 2, 3)))


def _quantize_pool(pool, scales=None):
    """A pool [nb, Hkv, bs, D] in e4m3 as the cache stores it, with its heads' scales [Hkv, 1]."""
    scales = _head_scales(pool) if scales is None else scales
    return ref.quantize(pool.transpose(1, 2), scales).transpose(1, 2).contiguous(), scales


def _dequantize_pool(pool8, scales, dtype):
    return ref.dequantize(pool8.transpose(1, 2), scales, dtype).transpose(1, 2).contiguous()


def _tables(lengths, bs, nb, seed):
    """Block tables [B, widest] int32 over scattered blocks."""
    need = [math.ceil(n / bs) for n in lengths]
    perm = torch.randperm(nb, generator=torch.Generator().manual_seed(seed)).tolist()
    tables = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    used = 0
    for b, n in enumerate(need):
        tables[b, :n] = torch.tensor(perm[used:used + n])
        used += n
    return tables, torch.tensor(lengths, dtype=torch.int32)


def test_quantize_rounds_each_value_to_e4m3_under_its_heads_scale_and_saturates_past_it():
    x, _ = _pools(4, 3, 8, 64, seed=0)
    x = x.transpose(1, 2).reshape(32, 3, 64)  # rows [T, Hkv, D]
    scales = ref.fp8_scales(x.abs().amax((0, 2)))
    assert scales.dtype == torch.float32 and scales.shape == (3, 1)
    assert torch.allclose(scales[:, 0].double() * ref.FP8_MAX, x.abs().amax((0, 2)).double() * ref.HEADROOM)
    x[0, 0] = 0.0  # an all-zero row
    x[1, 1, :2] = torch.tensor([1.0, -1.0]) * 2 * ref.HEADROOM * x[:, 1].abs().max()  # past what the scale covers
    rows = ref.quantize(x, scales)
    assert rows.dtype == torch.float8_e4m3fn and rows.shape == x.shape
    back = ref.dequantize(rows, scales, torch.float64)
    x64, s64 = x.double(), scales.double()
    bound = torch.maximum(E4M3_HALF_ULP * x64.abs(), E4M3_SUBNORMAL_STEP / 2 * s64) * (1 + 1e-6)
    inside = x64.abs() <= ref.FP8_MAX * s64
    assert ((back - x64).abs() <= bound)[inside].all()
    # values past the head's range saturate at e4m3's largest (float8_e4m3fn has no inf: not NaN)
    assert torch.equal(back[1, 1, :2], torch.tensor([1.0, -1.0], dtype=torch.float64) * ref.FP8_MAX * s64[1, 0])
    assert (back[0, 0] == 0).all() and back.isfinite().all()


def _float64_full(q, k, v, tables, lengths):
    """Softmax attention of one query per sequence, written out per sequence in float64 over pools k, v."""
    B, H, D = q.shape
    Hkv, bs = k.shape[1], k.shape[2]
    out = torch.zeros(B, H, D, dtype=torch.float64)
    for b in range(B):
        n = int(lengths[b])
        blocks, offs = [int(tables[b, p // bs]) for p in range(n)], [p % bs for p in range(n)]
        K, V = k[blocks, :, offs], v[blocks, :, offs]  # [n, Hkv, D]
        for h in range(H):
            p = torch.softmax(K[:, h // (H // Hkv)] @ q[b, h].double() / math.sqrt(D), 0)
            out[b, h] = p @ V[:, h // (H // Hkv)]
    return out


def test_reference_decodes_fp8_pools_as_float64_math_on_the_dequantised_values():
    """The pin: quantise, dequantise in float64, and the reference's scores (KCache with N covering everything
    keeps each token with its exact softmax weight) and outputs (FullKV, KCache) match float64 math on those values."""
    Hkv, G, bs, D = 2, 3, 8, 32
    lengths = [1, 29, 70]
    k, v = _pools(16, Hkv, bs, D, seed=1)
    tables, lens = _tables(lengths, bs, 16, seed=2)
    q = torch.randn(len(lengths), Hkv * G, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    k8, ks = _quantize_pool(k)
    v8, vs = _quantize_pool(v)
    k64, v64 = _dequantize_pool(k8, ks, torch.float64), _dequantize_pool(v8, vs, torch.float64)

    full = ref.full_decode(q, k8, v8, tables, lens, k_scales=ks, v_scales=vs)
    assert torch.allclose(full, _float64_full(q, k64, v64, tables, lens), rtol=0, atol=1e-12)

    # KCache's V stays in the model's dtype: pass the float64 dequantised V; every token kept, exact weights
    everything = KCacheConfig(top_n=128, renormalize=False, chunk_tokens=1)
    out, mass, _ = ref.kcache_decode(q, k8, v64, tables, lens, everything, k_scales=ks)
    assert torch.allclose(mass.double(), torch.ones_like(mass, dtype=torch.float64), atol=1e-5)
    assert _rel(out, _float64_full(q, k64, v64, tables, lens)) < 1e-5  # the scores are float32

    # and the scores that rank the chunks: the reference's softmax over FP8 K is float64's softmax over k64
    slots, valid = ref.token_slots(tables, lens, bs)
    p = ref._scores(q, ref.read_rows(k8, slots, ks, torch.float32).transpose(1, 2), valid, 1 / math.sqrt(D))
    want = ref._scores(q, ref.rows_at(k64, slots).transpose(1, 2).double(), valid, 1 / math.sqrt(D))
    assert torch.allclose(p, want, atol=1e-6)


def _exact_case(nb, Hkv, bs, D, n, seed):
    """K pools [nb, Hkv, bs, D] with n exact channels per head (distinct, random): (k, its e4m3 pool and scales of
    the rows with those channels zeroed, the ExactChannels, k as stored in float64)."""
    k, _ = _pools(nb, Hkv, bs, D, seed)
    g = torch.Generator().manual_seed(seed + 10)
    channels = torch.stack([torch.randperm(D, generator=g)[:n].sort().values for _ in range(Hkv)]).to(torch.int32)
    rows = lambda pool: pool.transpose(1, 2)  # noqa: E731  [nb, bs, Hkv, D]: split_exact takes rows of KV heads
    zeroed, values = ref.split_exact(rows(k), channels)
    k8, ks = _quantize_pool(rows(zeroed))  # the scales cover the channels left in e4m3
    exact = ref.ExactChannels(rows(values).contiguous(), channels)
    stored = rows(ref.join_exact(rows(_dequantize_pool(k8, ks, torch.float64)), values, channels))
    return k, k8, ks, exact, stored.contiguous()


def test_exact_channels_are_stored_as_they_are_and_the_rest_in_e4m3():
    k, k8, ks, exact, stored = _exact_case(6, 3, 8, 32, 4, seed=11)
    keep = torch.zeros(3, 32, dtype=torch.bool).scatter_(1, exact.channels.long(), True)  # [Hkv, D]
    assert torch.equal(stored[..., keep[None, :, None, :].expand_as(k)], k.double()[..., keep[None, :, None, :].expand_as(k)])
    assert (k8.float()[keep[None, :, None, :].expand_as(k)] == 0).all()
    others = _dequantize_pool(*_quantize_pool(k.masked_fill(keep[None, :, None, :], 0.0), ks), torch.float64)
    assert torch.equal(stored.masked_fill(keep[None, :, None, :], 0.0), others)
    slots = torch.tensor([0, 5, 17, 40])
    assert torch.equal(ref.read_rows(k8, slots, ks, torch.float64, exact), ref.rows_at(stored, slots))


def test_reference_decodes_exact_channels_as_float64_math_on_the_stored_values():
    """With exact channels, the reference's FullKV and KCache outputs are float64 attention over K as stored (the
    exact channels exactly, the rest dequantised)."""
    Hkv, G, bs, D = 2, 3, 8, 32
    lengths = [1, 29, 70]
    _, k8, ks, exact, k64 = _exact_case(16, Hkv, bs, D, 4, seed=12)
    _, v = _pools(16, Hkv, bs, D, seed=13)
    tables, lens = _tables(lengths, bs, 16, seed=14)
    q = torch.randn(len(lengths), Hkv * G, D, generator=torch.Generator().manual_seed(15), dtype=torch.float64)
    v8, vs = _quantize_pool(v)
    v64 = _dequantize_pool(v8, vs, torch.float64)
    want = _float64_full(q, k64, v64, tables, lens)
    full = ref.full_decode(q, k8, v8, tables, lens, k_scales=ks, v_scales=vs, k_exact=exact)
    assert torch.allclose(full, want, rtol=0, atol=1e-12)
    everything = KCacheConfig(top_n=128, renormalize=False, chunk_tokens=1)
    out, mass, _ = ref.kcache_decode(q, k8, v64, tables, lens, everything, k_scales=ks, k_exact=exact)
    assert _rel(out, want) < 1e-5 and torch.allclose(mass.double(), torch.ones_like(mass, dtype=torch.float64), atol=1e-5)


def _model(layers=2, heads=4, kv_heads=2, head_dim=16):
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=32, hidden_size=heads * head_dim, intermediate_size=32, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_position_embeddings=256)


def _fp8(m, channels=None, k_scale=0.05, v_scale=0.02):
    """A calibration for model m: every head's K and V scales, and the exact channels (if any)."""
    full = lambda x: torch.full((m.num_layers, m.num_kv_heads, 1), x)  # noqa: E731
    return kv.Fp8Calibration(full(k_scale), full(v_scale), channels)


@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_fp8_pools_are_what_the_spec_counts(cache):
    m = _model()
    dense = None if cache == "full" else 1
    spec = kv.cache_spec(m, torch.float32, dense, "fp8")
    plain = kv.cache_spec(m, torch.float32, dense, "auto")
    row, fp8_row = m.num_kv_heads * m.head_dim * 4, m.num_kv_heads * m.head_dim  # one token, one layer
    if cache == "full":  # K and V in FP8
        assert (spec.device_bytes_per_token, spec.host_bytes_per_token) == (2 * m.num_layers * fp8_row, 0)
        c = kv.FullKV(m, 5, 8, torch.float32, "cpu", kv_cache_dtype="fp8", calibration=_fp8(m))
        held = [c.k, c.v]
        assert torch.equal(c.pools(1).v_scales, torch.full((m.num_kv_heads, 1), 0.02))
    else:  # FP8 K; V of the dense layer on the device and the rest on the host in the model's dtype
        assert spec.device_bytes_per_token == m.num_layers * fp8_row + row
        assert spec.host_bytes_per_token == plain.host_bytes_per_token == row
        c = kv.KCache(m, 5, 8, torch.float32, "cpu", KCacheConfig(dense_layers=1, chunk_tokens=8), kv_cache_dtype="fp8",
                      calibration=_fp8(m))
        held = [c.k, c.v_dense]
        assert c.host_bytes() == c.v_host.numel() * c.v_host.element_size()
        assert c.pools(1).v_scales is None
    assert c.k.dtype == torch.float8_e4m3fn and torch.equal(c.pools(1).k_scales, torch.full((m.num_kv_heads, 1), 0.05))
    assert c.device_bytes() == sum(t.numel() * t.element_size() for t in held)  # the heads' scales are not counted
    with pytest.raises(ValueError, match="FP8 pools need their scales"):
        kv.FullKV(m, 5, 8, torch.float32, "cpu", kv_cache_dtype="fp8")
    with pytest.raises(ValueError, match="FP8 scales"):
        kv.FullKV(m, 5, 8, torch.float32, "cpu", kv_cache_dtype="fp8",
                  calibration=kv.Fp8Calibration(torch.ones(1, m.num_kv_heads, 1), torch.ones(1, m.num_kv_heads, 1)))


@pytest.mark.parametrize("cache", ["full", "kcache"])
def test_exact_channels_take_n_values_per_row_in_the_models_dtype(cache):
    m = _model()
    dense = None if cache == "full" else 1
    plain, spec = kv.cache_spec(m, torch.bfloat16, dense, "fp8"), kv.cache_spec(m, torch.bfloat16, dense, "fp8",
                                                                            exact_channels=4)
    assert spec.device_bytes_per_token - plain.device_bytes_per_token == m.num_layers * m.num_kv_heads * 4 * 2  # K only
    channels = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]], dtype=torch.int32).expand(m.num_layers, -1, -1)
    kcfg = KCacheConfig(dense_layers=1, chunk_tokens=8)
    c = (kv.FullKV(m, 5, 8, torch.bfloat16, "cpu", "fp8", _fp8(m, channels)) if cache == "full" else
         kv.KCache(m, 5, 8, torch.bfloat16, "cpu", kcfg, "fp8", calibration=_fp8(m, channels)))
    assert c.num_exact_channels == 4 and c.k_exact_values.shape == (*c.k.shape[:-1], 4)
    assert c.k_exact_values.dtype == torch.bfloat16 and torch.equal(c.pools(1).k_exact.channels, channels[1])
    held = [c.k, c.k_exact_values] + ([c.v] if cache == "full" else [c.v_dense])
    assert c.device_bytes() == sum(t.numel() * t.element_size() for t in held)
    assert kv.FullKV(m, 5, 8, torch.bfloat16, "cpu", "auto", _fp8(m, channels)).num_exact_channels == 0  # FP8 K only
    with pytest.raises(ValueError, match="exact channels"):
        kv.FullKV(m, 5, 8, torch.bfloat16, "cpu", "fp8", _fp8(m, channels[:1]))


def test_fp8_host_v_halves_the_host_pool():
    m = _model(layers=3)
    spec, plain = kv.cache_spec(m, torch.bfloat16, 1, "auto", "fp8"), kv.cache_spec(m, torch.bfloat16, 1)
    host_layers = m.num_layers - 1
    assert 2 * spec.host_bytes_per_token == plain.host_bytes_per_token == host_layers * m.num_kv_heads * m.head_dim * 2
    assert spec.device_bytes_per_token == plain.device_bytes_per_token
    fp8 = _fp8(m)
    fp8.v_scales[2] = 0.5  # the last layer's heads
    c = kv.KCache(m, 5, 8, torch.bfloat16, "cpu", KCacheConfig(dense_layers=1, chunk_tokens=8), host_v_dtype="fp8",
                  calibration=fp8)
    assert c.v_host.dtype == torch.float8_e4m3fn and c.v_dense.dtype == c.k.dtype == torch.bfloat16
    assert c.host_bytes() == c.v_host.numel() and c.host_bytes() * 2 == plain.host_bytes_per_token * c.num_tokens
    assert c.device_bytes() == sum(t.numel() * t.element_size() for t in (c.k, c.v_dense))
    assert c.pools(0).v_scales is None and c.pools(1).k_scales is None  # the dense layer's V and K are as the model's
    assert torch.equal(c.pools(2).v_scales, torch.full((m.num_kv_heads, 1), 0.5))  # each host layer its own
    with pytest.raises(ValueError, match="host_v_dtype"):
        EngineConfig(cache="full", host_v_dtype="fp8")


# K and V storage of each case: (cache, FP8 K, FP8 V, exact K channels)
STORAGE = {"full": ("full", True, True, False), "kcache": ("kcache", True, False, False),
           "kcache-host-v": ("kcache", False, True, False), "full-exact": ("full", True, True, True),
           "kcache-exact": ("kcache", True, False, True)}


@pytest.mark.parametrize("case", list(STORAGE))
def test_fp8_cache_stores_quantised_rows_and_decodes_them(case):
    """Prefill two chunks, then a decode step, through the cache's attend: the FP8 pools hold each row's e4m3
    rounding; the second chunk attends to the first as stored and to itself exactly; decode reads every row as
    stored (FullKV: K and V in FP8; KCache: FP8 K, or FP8 host V)."""
    cache, fp8_k, fp8_v, with_exact = STORAGE[case]
    m = _model(layers=1)
    bs, T = 8, 20
    channels = torch.tensor([[[2, 7]] * m.num_kv_heads], dtype=torch.int32) if with_exact else None
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(T + 1, h, m.head_dim, generator=g) for h in (m.num_heads, m.num_kv_heads, m.num_kv_heads))
    k = k * torch.tensor([1.0, 8.0])[:, None]  # heads of different ranges: each its own scale
    ks, vs = ref.fp8_scales(k.abs().amax((0, 2))), ref.fp8_scales(v.abs().amax((0, 2)))
    fp8 = kv.Fp8Calibration(ks[None], vs[None], channels)
    c = (kv.FullKV(m, 6, bs, torch.float32, "cpu", kv_cache_dtype="fp8", calibration=fp8) if cache == "full"
         else kv.KCache(m, 6, bs, torch.float32, "cpu", KCacheConfig(top_n=64, chunk_tokens=1),
                        kv_cache_dtype="fp8" if fp8_k else "auto", host_v_dtype="fp8" if fp8_v else "auto", calibration=fp8))
    table = torch.tensor([[3, 0, 5]], dtype=torch.int32)
    slots = (table[0].long()[torch.arange(T + 1) // bs] * bs + torch.arange(T + 1) % bs)
    for start, n in ((0, 12), (12, T - 12)):
        batch = kv.StepBatch(True, slots[start:start + n], table, torch.tensor([start + n], dtype=torch.int32),
                             chunk_starts=(0,), chunk_lens=(n,), context_lens=(start,))
        out = c.attend(0, q[start:start + n], k[start:start + n], v[start:start + n], batch)
    stored = lambda x, s, on: ref.dequantize(ref.quantize(x, s), s, torch.float32) if on else x  # noqa: E731
    k_stored, v_stored = stored(k, ks, fp8_k), stored(v, vs, fp8_v)
    assert torch.equal(k_stored, k) != fp8_k and torch.equal(v_stored, v) != fp8_v
    if with_exact:  # the exact channels as they are, the rest rounded without them
        zeroed, values = ref.split_exact(k, channels[0])
        k_stored = ref.join_exact(stored(zeroed, ks, True), values, channels[0])
        assert torch.equal(k_stored[:, :, [2, 7]], k[:, :, [2, 7]]) and not torch.equal(k_stored, k)
    pools = c.pools(0)
    assert torch.equal(ref.read_rows(pools.k, slots[:T], pools.k_scales, torch.float32, pools.k_exact), k_stored[:T])
    assert torch.equal(ref.read_rows(pools.v, slots[:T], pools.v_scales, torch.float32), v_stored[:T])
    # the second chunk: the first chunk's rows as stored, its own exactly
    k_seen, v_seen = torch.cat([k_stored[:12], k[12:T]]), torch.cat([v_stored[:12], v[12:T]])
    assert torch.allclose(out, ref.prefill_attention(q[12:T], k_seen, v_seen, 12), atol=1e-6)
    step = kv.StepBatch(False, slots[T:], table, torch.tensor([T + 1], dtype=torch.int32))
    got = c.attend(0, q[T:], k[T:], v[T:], step)
    want = ref.prefill_attention(q[T:], k_stored, v_stored, T)  # causal attention's last row: a decode step's
    assert torch.allclose(got, want, atol=1e-5)


def test_fp8_where_the_gpu_cannot_convert_it_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(kv.KVCacheDtypeError, match=r"compute capability 8.9 or newer.*A100.* 8\.0"):
        kv.check_fp8(torch.device("cuda"))
    from kcache.cli import user_errors

    assert issubclass(kv.KVCacheDtypeError, user_errors())


def test_kv_cache_dtype_is_validated_and_defaults_to_auto():
    assert EngineConfig().kv_cache_dtype == "auto"
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        EngineConfig(kv_cache_dtype="int8")


def test_an_updated_config_is_validated_like_a_new_one():
    """The bench derives each mode's config from the command line's: an FP8 host V on the full cache is refused
    there as it is when built (model_copy would have let it through)."""
    base = EngineConfig(host_v_dtype="fp8", kcache=KCacheConfig(top_n=64))
    assert base.updated(enable_prefix_caching=False).kcache.top_n == 64
    with pytest.raises(ValueError, match="host_v_dtype"):
        base.updated(cache="full")
    assert base.updated(cache="full", host_v_dtype="auto").cache == "full"


# ---- the Triton kernels, under the interpreter on CPU (or on a GPU) ---------------------------------------------

def _triton_device():
    try:
        import triton  # noqa: F401
    except ImportError:
        return None
    if torch.cuda.is_available():
        return "cuda"
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else None


def needs_triton(test):
    """A kernel test: marked gpu (so `-m gpu` selects it on a GPU), run under the interpreter on CPU too."""
    skip = pytest.mark.skipif(_triton_device() is None, reason="needs Triton: a CUDA GPU, or TRITON_INTERPRET=1")
    return pytest.mark.gpu(skip(test))


def _kernel_case(lengths, seed, dtype=torch.float32, exact=0):
    """FP8 K and V pools with their scales, and their dequantised float copies, on the kernels' device; with
    `exact` > 0, K keeps that many channels per head exact (kx: the ExactChannels on the device, values in dtype;
    k_deq: K as stored)."""
    dev = _triton_device()
    Hkv, G, bs, D = 2, 4, 16, 32
    nb = sum(math.ceil(n / bs) for n in lengths) + 2
    _, v = _pools(nb, Hkv, bs, D, seed)
    k, k8, ks, kx, k_deq = _exact_case(nb, Hkv, bs, D, exact, seed) if exact else (None, None, None, None, None)
    if not exact:
        k, _ = _pools(nb, Hkv, bs, D, seed)
        k8, ks = _quantize_pool(k)
        k_deq = _dequantize_pool(k8, ks, torch.float64)
    else:  # the values in the queries' dtype, as the cache keeps them in the model's; K as stored with them rounded so
        kx = ref.ExactChannels(kx.values.to(dtype), kx.channels)
        k_deq = ref.join_exact(k_deq.transpose(1, 2), kx.values.transpose(1, 2).double(), kx.channels).transpose(1, 2)
    tables, lens = _tables(lengths, bs, nb, seed + 1)
    q = 2 * torch.randn(len(lengths), Hkv * G, D, generator=torch.Generator().manual_seed(seed + 2))
    v8, vs = _quantize_pool(v)
    on = lambda t: t.to(dev)  # noqa: E731
    return dict(q=on(q.to(dtype)), k8=on(k8), ks=on(ks), v8=on(v8), vs=on(vs), v=on(v.to(dtype)), tables=on(tables),
                lens=on(lens), k_deq=k_deq.contiguous(), v_deq=_dequantize_pool(v8, vs, torch.float64),
                kx=None if kx is None else ref.ExactChannels(on(kx.values), on(kx.channels)),
                kx_cpu=None if kx is None else ref.ExactChannels(kx.values.contiguous(), kx.channels))


def _rel(out, want):
    return ((out.double().cpu() - want.double()).norm() / want.double().norm()).item()


# 16-bit queries take the kernels' e4m3 tensor-core path (their parts, an fp16 weighted sum); bf16 only on a GPU
# (the interpreter's bf16 is broken). Outputs in 16 bits carry their own rounding (~2^-9 for bf16, 2^-12 for fp16).
QUERY_DTYPES = [torch.float32, torch.float16,
                pytest.param(torch.bfloat16, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU"))]
OUT_TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 4e-3}


@needs_triton
@pytest.mark.parametrize("exact", [0, 4])
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
def test_triton_full_decode_dequantises_fp8_k_and_v(dtype, exact):
    """FP8 K and V (K with 4 channels per head kept exact, or none): float64 attention over the values stored."""
    from kcache.attention import triton_decode as td

    c = _kernel_case([1, 40, 150], seed=5, dtype=dtype, exact=exact)
    out = td.full_decode(c["q"], c["k8"], c["v8"], c["tables"], c["lens"], k_scales=c["ks"], v_scales=c["vs"],
                         k_exact=c["kx"])
    want = _float64_full(c["q"].cpu().double(), c["k_deq"], c["v_deq"], c["tables"].cpu(), c["lens"].cpu())
    assert out.dtype == dtype and _rel(out, want) < OUT_TOLERANCE[dtype]


@needs_triton
@pytest.mark.parametrize("selection,chunk,exact", [("group", 1, 0), ("group", 8, 0), ("head", 1, 0), ("head", 8, 0),
                                                   ("group", 8, 4), ("head", 1, 4)])
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
def test_triton_kcache_decode_scans_fp8_k_like_the_reference(selection, chunk, exact, dtype):
    """The scan, the selection and the gather's logits over FP8 K (with exact channels, or none): the same chunks,
    weights, masses and outputs as the reference over the same pools (whose own dequantisation the float64 tests
    pin)."""
    from kcache.attention import triton_decode as td

    c = _kernel_case([3, 100, 200], seed=6, dtype=dtype, exact=exact)
    cfg = KCacheConfig(top_n=32, selection=selection, chunk_tokens=chunk, sink_tokens=2)
    out, mass, rows = td.kcache_decode(c["q"], c["k8"], c["v"], c["tables"], c["lens"], cfg, k_scales=c["ks"],
                                       k_exact=c["kx"])
    cpu = {n: t.cpu() for n, t in c.items() if isinstance(t, torch.Tensor)}
    kx = c["kx_cpu"] and ref.ExactChannels(c["kx_cpu"].values.double(), c["kx_cpu"].channels)
    want, want_mass, want_rows = ref.kcache_decode(cpu["q"].double(), cpu["k8"], cpu["v"].double(), cpu["tables"],
                                                   cpu["lens"], cfg, k_scales=cpu["ks"], k_exact=kx)
    assert _rel(out, want) < OUT_TOLERANCE[dtype] and _rel(mass, want_mass) < 3e-5
    assert torch.equal(rows.cpu(), want_rows)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # float16: the tensor-core sum of split weights
@pytest.mark.parametrize("chunk", [1, 8])
def test_triton_kcache_decode_reads_fp8_v_like_the_reference(dtype, chunk):
    """K in the model's dtype, V FP8 with its scales: the stage copies e4m3 rows, the sum folds each row's scale into
    its weight; the float64 reference over the same pools gives the same outputs, masses and rows read."""
    from kcache.attention import triton_decode as td

    c = _kernel_case([3, 100, 200], seed=8, dtype=dtype)
    k = c["k_deq"].to(dtype).to(c["q"].device)
    cfg = KCacheConfig(top_n=32, chunk_tokens=chunk, sink_tokens=2)
    out, mass, rows = td.kcache_decode(c["q"], k, c["v8"], c["tables"], c["lens"], cfg, v_scales=c["vs"])
    cpu = {n: t.cpu() for n, t in c.items() if isinstance(t, torch.Tensor)}
    want, want_mass, want_rows = ref.kcache_decode(cpu["q"].double(), k.cpu().double(), cpu["v8"], cpu["tables"],
                                                   cpu["lens"], cfg, v_scales=cpu["vs"])
    assert out.dtype == dtype and _rel(out, want) < (1e-5 if dtype == torch.float32 else 2e-3)
    assert _rel(mass, want_mass) < 3e-5 and torch.equal(rows.cpu(), want_rows)  # float32 softmax against float64


@needs_triton
@pytest.mark.parametrize("outlier", [False, True])
@pytest.mark.parametrize("exact", [0, 4])
@pytest.mark.parametrize("dtype", QUERY_DTYPES)
def test_triton_chunk_scores_are_the_float64_scores_of_the_dequantised_k(dtype, exact, outlier):
    """16-bit queries in fp16 over a power-of-two row scale lose nothing, also where one channel is 2^14 times the
    rest (2^12 in fp16, whose range ends at 65504), as LLM queries' outlier channels can be (e4m3 parts of such a row
    lost its elements below ~2^-13 of the largest): the logits are the float64 ones of the 16-bit queries over K as
    stored (with 4 exact channels, or none), as with float32 queries."""
    from kcache.attention import triton_decode as td

    c = _kernel_case([64, 130], seed=7, dtype=dtype, exact=exact)
    if outlier:
        c["q"][..., 5] *= 2.0 ** (12 if dtype == torch.float16 else 14)  # a power of two: exact in every dtype
    D = c["q"].shape[-1]
    lse, m, l = td.chunk_scores(c["q"], c["k8"], c["tables"], c["lens"], 1, 1 / math.sqrt(D), k_scales=c["ks"],
                                k_exact=c["kx"])
    slots, valid = ref.token_slots(c["tables"].cpu(), c["lens"].cpu(), c["k8"].shape[2])
    k = ref.rows_at(c["k_deq"], slots).transpose(1, 2)  # [B, Hkv, L, D] float64
    B, H, _ = c["q"].shape
    logits = (c["q"].cpu().double().view(B, k.shape[1], H // k.shape[1], D) @ k.transpose(-1, -2)) / math.sqrt(D)
    for b, n in enumerate(c["lens"].tolist()):  # chunks of one token: their log-sum-exp is the logit itself
        assert torch.allclose(lse[b, ..., :n].cpu().double(), logits[b, ..., :n], rtol=1e-6, atol=1e-4)


@needs_triton
def test_triton_row_copies_move_fp8_rows_unchanged():
    from kcache.attention import triton_decode as td

    dev = _triton_device()
    x = torch.randn(5, 2, 32)
    rows = ref.quantize(x, ref.fp8_scales(x.abs().amax((0, 2))))
    pool = torch.zeros(4, 2, 8, 32, dtype=torch.float8_e4m3fn, device=dev)
    slots = torch.tensor([3, 9, 17, 30, 31], device=dev)
    td.store_rows(pool, rows.to(dev), slots)
    assert torch.equal(td.load_rows(pool, slots).cpu().view(torch.uint8), rows.view(torch.uint8))
    assert torch.equal(ref.load_rows(pool.cpu(), slots.cpu()).view(torch.uint8), rows.view(torch.uint8))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("hkv,exact", [(2, 0), (3, 4), (8, 4)])
def test_triton_store_quantises_like_the_reference(hkv, exact, dtype):
    """The fused store (quantise, zero the exact channels, store both pools, one launch) writes the bytes the
    reference's split_exact, quantize and store_rows write, saturating values past the scale's range. Under the
    interpreter only the exact channels are compared: its float32 -> e4m3 conversion drops a rounding's carry into the
    exponent (31.9 -> 16) and flushes e4m3 subnormals, where the GPU converts in hardware."""
    from kcache.attention import triton_decode as td

    dev = _triton_device()
    gen = torch.Generator().manual_seed(11)
    T, nb, bs, D = 21, 6, 8, 64
    x = (3 * torch.randn(T, hkv, D, generator=gen)).to(dtype)
    x[0, 0, 1] = 6e4  # past 448 x its head's scale: saturates
    scales = ref.fp8_scales(x.float().abs().amax((0, 2)) / 4)
    slots = torch.randperm(nb * bs, generator=gen)[:T]
    channels = torch.stack([torch.randperm(D, generator=gen)[:exact].sort().values for _ in range(hkv)]).int()
    pools = lambda: (torch.zeros(nb, hkv, bs, D, dtype=torch.float8_e4m3fn),  # noqa: E731
                     ref.ExactChannels(torch.zeros(nb, hkv, bs, exact, dtype=dtype), channels) if exact else None)
    want, want_exact = pools()
    ref.store_rows(want, x, slots, scales, want_exact)
    got, got_exact = pools()
    got = got.to(dev)
    on_dev = got_exact and ref.ExactChannels(got_exact.values.to(dev), channels.to(dev))
    td.store_rows(got, x.to(dev), slots.to(dev), scales.to(dev), on_dev)
    if exact:
        assert torch.equal(on_dev.values.cpu(), want_exact.values)
        zeros = ref.rows_at(got.cpu().float(), slots).gather(-1, channels.long().expand(T, hkv, exact))
        assert not zeros.any()  # the e4m3 rows hold 0 where the exact values are
    if dev == "cuda":
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))


# ---- exact channels: the calibration and what they buy on real weights -------------------------------------------

def test_calibration_finds_a_heads_loud_channel_pair_and_scales_the_rest(tmp_path):
    """A K channel made 30x louder in one head's weights is found (with its rotary partner, which the fastest rotation
    mixes it into evenly) by the calibration prefill; ascending, [layers, Hkv, n] int32. The scales are each head's
    largest |k| outside its exact channels and largest |v| over the same prefill, HEADROOM over them."""
    from conftest import save_tiny

    from kcache.engine import calibration
    from kcache.models import loader

    save_tiny("llama", tmp_path)
    loaded = loader.load(str(tmp_path), device="cpu")
    cfg = loaded.config
    D, c = cfg.head_dim, 0
    with torch.no_grad():
        loaded.model.model.layers[1].self_attn.k_proj.weight[D + c] *= 30  # layer 1, KV head 1, channel 0
    ids = calibration.calibration_ids(None, cfg.vocab_size, 256)
    fp8 = calibration.calibrate(loaded.model, ids, 2)
    channels = fp8.channels
    assert channels.shape == (cfg.num_layers, cfg.num_kv_heads, 2) and channels.dtype == torch.int32
    assert channels[1, 1].tolist() == [c, c + D // 2]
    assert (channels[..., 1] > channels[..., 0]).all()
    seen = {}  # layer -> the K and V its prefill stored

    def record(layer, q, k, v, batch):
        seen[layer] = k.float(), v.float()
        return ref.prefill_attention(q, k, v, 0)

    cache = type("Recorder", (), {"attend": staticmethod(record)})()
    T = len(ids)
    empty = torch.zeros(0, dtype=torch.int32)
    batch = kv.StepBatch(True, empty.long(), empty[None], empty, chunk_starts=(0,), chunk_lens=(T,), context_lens=(0,))
    with torch.no_grad():
        loaded.model(torch.tensor(ids), torch.arange(T), cache, batch)
    for layer, (k, v) in seen.items():
        rest = k.scatter(-1, channels[layer].long().expand(T, -1, -1), 0.0)  # the channels left in e4m3
        assert torch.allclose(fp8.k_scales[layer], ref.fp8_scales(rest.abs().amax((0, 2))))
        assert torch.allclose(fp8.v_scales[layer], ref.fp8_scales(v.abs().amax((0, 2))))
    assert fp8.k_scales[1, 1] < ref.fp8_scales(seen[1][0][:, 1].abs().amax())  # the loud channel sets no scale
    assert calibration.calibrate(loaded.model, ids, 0).channels is None
    with pytest.raises(ValueError, match="fp8_exact_channels"):
        calibration.calibrate(loaded.model, ids, D + 1)


def test_exact_channels_bring_fp8_k_close_to_the_exact_cache_on_smollm2(smollm2, smollm2_tokenizer):
    """SmolLM2's real weights, 256 tokens of Sherlock Holmes scored after 512: FP8 K with each head's 4 calibrated
    channels exact is far closer to the float32 cache (KL of the next-token distributions) than plain e4m3 K."""
    from kcache.engine import scoring
    from kcache.engine.llm_engine import LLMEngine
    from kcache.engine.sequence import Sequence
    from kcache.eval.haystack import read_text
    from kcache.eval.metrics import mean_kl
    from kcache.config import SamplingParams

    ids = smollm2_tokenizer(read_text("sherlock")[:8000], verbose=False)["input_ids"][:768]

    def logits(**kw):
        eng = LLMEngine(EngineConfig(model="unused", cache="full", device="cpu", max_model_len=1024,
                                     device_cache_bytes=64 << 20, **kw), loaded=smollm2)
        seq = Sequence("s", ids, SamplingParams(), num_prompt=512)
        eng.blocks.allocate(seq)
        scoring.prefill(eng.runner, seq, 512)
        forced, _ = scoring.teacher_force(eng.runner, seq, len(ids) - 1, 64)
        return forced

    exact = logits()
    plain = mean_kl(exact, logits(kv_cache_dtype="fp8", fp8_exact_channels=0))
    kept = mean_kl(exact, logits(kv_cache_dtype="fp8"))  # the default: 4 channels
    assert 0 < kept < 0.5 * plain, (kept, plain)

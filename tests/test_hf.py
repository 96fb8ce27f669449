"""kcache.hf on tiny random Llama, Qwen2 and Mistral models built by transformers: exactness against the default
cache, left padding, stats, dense layers, sinks, and the errors for setups it does not support."""
import pytest
import torch
import transformers
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from kcache.config import KCacheConfig
from kcache.hf import KCacheHF, check_transformers_version

# transformers >= 5.24 renamed generate's `past_key_values=` to `cache=`; the old name is the one that works across
# the whole supported window, so the tests use it and silence the rename notice
pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

SIZES = dict(
    hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
    vocab_size=128, max_position_embeddings=256, bos_token_id=None, eos_token_id=None, pad_token_id=0,
)  # no EOS: every generation runs its full length
ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
}
PROMPT, NEW = 24, 40
HEAD_DIM = SIZES["hidden_size"] // SIZES["num_attention_heads"]
ROW_BYTES = HEAD_DIM * 4  # one V row of one KV head, float32


def tiny(arch: str, **overrides):
    config_cls, model_cls = ARCHS[arch]
    torch.manual_seed(0)
    return model_cls(config_cls(**{**SIZES, **overrides})).eval()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and lose a lot to them when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", params=list(ARCHS))
def model(request):
    return tiny(request.param)


def prompts(pads=(0,)):
    """A left-padded batch, one row per entry of pads (its number of padding tokens): ids, mask [B, PROMPT]."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, SIZES["vocab_size"], (len(pads), PROMPT), generator=g)
    mask = torch.ones_like(ids)
    for b, n in enumerate(pads):
        ids[b, :n], mask[b, :n] = SIZES["pad_token_id"], 0
    return ids, mask


def generate(model, ids, mask, cache=None, attn="kcache", new=NEW):
    """Greedy continuation [B, new]; cache None means generate's default cache."""
    model.set_attn_implementation(attn)
    extra = {} if cache is None else {"past_key_values": cache}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, **extra)
    return out[:, ids.shape[1]:]


def reference(model, ids, mask):
    return generate(model, ids, mask, attn="sdpa")


def test_full_budget_matches_default_cache(model):
    ids, mask = prompts()
    cache = KCacheHF(model.config, top_n=PROMPT + NEW)
    assert torch.equal(generate(model, ids, mask, cache), reference(model, ids, mask))
    assert cache.stats.mass_kept_min > 0.9999


def test_left_padded_batch_matches_default_cache(model):
    ids, mask = prompts(pads=(0, 5, 11))
    cache = KCacheHF(model.config, top_n=PROMPT + NEW)
    assert torch.equal(generate(model, ids, mask, cache), reference(model, ids, mask))


@torch.no_grad()
def test_prompt_in_two_chunks_matches_one_pass(model):
    """A chunk added to a filled cache attends exactly to the stored (compacted) tokens and causally to itself."""
    ids, mask = prompts(pads=(0, 5))
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    model.set_attn_implementation("sdpa")
    want = model(ids, attention_mask=mask, position_ids=pos).logits[mask.bool()]
    model.set_attn_implementation("kcache")
    cache, cut = KCacheHF(model.config), 16
    for _ in range(2):  # the second time after a reset
        cache.reset()
        first = model(ids[:, :cut], attention_mask=mask[:, :cut], position_ids=pos[:, :cut], past_key_values=cache)
        second = model(ids[:, cut:], attention_mask=mask, position_ids=pos[:, cut:], past_key_values=cache)
        got = torch.cat([first.logits, second.logits], 1)[mask.bool()]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("selection", ["group", "head"])
def test_small_top_n_reports_stats(model, selection):
    top_n, pads = 30, (0, 6)
    ids, mask = prompts(pads)
    cache = KCacheHF(model.config, top_n=top_n, selection=selection, chunk_tokens=1)
    assert generate(model, ids, mask, cache).shape == (len(pads), NEW)
    stats, c = cache.stats, model.config
    assert stats.decode_steps == NEW - 1  # the first new token comes from prefill
    assert 0 < stats.mass_kept_min <= stats.mass_kept_mean < 1
    # Each decode step, every sequence reads min(top_n, its length) rows per KV head (per query head with "head"
    # selection) in every layer; a sequence with p pads holds PROMPT - p + s tokens at step s.
    per_kv_head = c.num_attention_heads // c.num_key_value_heads if selection == "head" else 1
    rows = sum(min(top_n, PROMPT - p + s) for s in range(1, NEW) for p in pads)
    rows *= c.num_key_value_heads * per_kv_head * c.num_hidden_layers
    assert stats.v_bytes_read == rows * ROW_BYTES
    assert stats.host_bytes == stats.device_bytes  # V on the host, K on the device: same shapes
    assert stats.host_bytes >= len(pads) * (PROMPT + NEW - 1) * c.num_key_value_heads * ROW_BYTES * c.num_hidden_layers


def test_dense_layers_keep_v_on_device_and_decode_exactly(model):
    ids, mask = prompts(pads=(0, 7))
    layers = model.config.num_hidden_layers
    cache = KCacheHF(model.config, top_n=1, dense_layers=layers)
    assert torch.equal(generate(model, ids, mask, cache), reference(model, ids, mask))
    assert cache.stats.v_bytes_read == 0 and cache.stats.host_bytes == 0

    cache = KCacheHF(model.config, top_n=4, dense_layers=1, chunk_tokens=1)
    generate(model, ids, mask, cache)
    stats = cache.stats
    assert stats.v_bytes_read == (NEW - 1) * 4 * 2 * model.config.num_key_value_heads * (layers - 1) * ROW_BYTES
    assert stats.device_bytes == (layers + 1) * stats.host_bytes  # every K and layer 0's V vs layer 1's V


def test_sinks_and_recent_tokens_skip_left_padding(model):
    """Sinks are a sequence's first real tokens: padding a prompt in a batch must not change its continuation."""
    cfg = KCacheConfig(top_n=2, sink_tokens=2, recent_tokens=2)
    pads = (0, 9)
    ids, mask = prompts(pads)
    batched = generate(model, ids, mask, KCacheHF(model.config, cfg=cfg))
    for b, n in enumerate(pads):
        alone = generate(model, ids[b:b + 1, n:], mask[b:b + 1, n:], KCacheHF(model.config, cfg=cfg))
        assert torch.equal(batched[b:b + 1], alone)


def test_kcache_cache_needs_kcache_attention(model):
    ids, mask = prompts()
    with pytest.raises(ValueError, match="attn_implementation='kcache'"):
        generate(model, ids, mask, KCacheHF(model.config), attn="sdpa")


def test_kcache_attention_needs_kcache_cache(model):
    ids, mask = prompts()
    with pytest.raises(ValueError, match="needs a KCacheHF cache"):
        generate(model, ids, mask, cache=None)


def test_options_and_cfg_are_exclusive(model):
    with pytest.raises(ValueError, match="either cfg"):
        KCacheHF(model.config, cfg=KCacheConfig(), top_n=8)


def test_unsupported_architecture():
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, bos_token_id=None, eos_token_id=None)
    gpt2 = GPT2LMHeadModel._from_config(config, attn_implementation="kcache")
    with pytest.raises(ValueError, match="got model_type 'gpt2'"):
        KCacheHF(gpt2.config)
    with pytest.raises(ValueError, match="got model_type 'gpt2'"):
        gpt2(torch.ones(1, 4, dtype=torch.long))


def test_mistral_window_shorter_than_sequence():
    mistral = tiny("mistral", sliding_window=PROMPT + 8)
    ids, mask = prompts()
    # generating n tokens caches PROMPT + n - 1: 9 fill the window exactly, and there it is plain causal attention
    fits = generate(mistral, ids, mask, KCacheHF(mistral.config), new=9)
    assert torch.equal(fits, generate(mistral, ids, mask, attn="sdpa", new=9))
    with pytest.raises(ValueError, match="sliding window of 32 tokens, shorter than the sequence"):
        generate(mistral, ids, mask, KCacheHF(mistral.config), new=10)


def test_transformers_version_window():
    check_transformers_version(transformers.__version__)
    for ok in ("5.4.0", "5.17.0", "5.39.2"):
        check_transformers_version(ok)
    for bad in ("4.57.6", "5.3.0", "5.40.0", "6.0.0"):
        with pytest.raises(ValueError, match=f"found transformers {bad}"):
            check_transformers_version(bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_keeps_k_on_device_and_v_in_pinned_host_memory():
    llama = tiny("llama").cuda()
    ids, mask = (t.cuda() for t in prompts(pads=(0, 5)))
    cache = KCacheHF(llama.config, top_n=PROMPT + NEW, dense_layers=1)
    assert torch.equal(generate(llama, ids, mask, cache), reference(llama, ids, mask))
    dense, sparse = cache.layers
    assert dense.keys.is_cuda and dense.values.is_cuda
    assert sparse.keys.is_cuda and not sparse.values.is_cuda and sparse.values.is_pinned()
    assert cache.stats.v_bytes_read > 0

"""Shared fixtures: tiny random checkpoints written by transformers, and the bundled SmolLM2."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-5)


def tiny_hf_config(arch: str):
    """Small configs of each supported family; llama uses llama3 rope scaling so its code path is tested."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    if arch == "llama":
        return LlamaConfig(**TINY, tie_word_embeddings=False, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 128})
    if arch == "qwen2":
        return Qwen2Config(**TINY, tie_word_embeddings=True, rope_theta=1e6)
    if arch == "mistral":
        return MistralConfig(**{**TINY, "num_attention_heads": 8, "head_dim": 16}, sliding_window=512)
    raise ValueError(arch)


def save_tiny(arch: str, folder, seed: int = 0):
    """A random transformers model saved as config.json + model.safetensors; returns the model (float32, eval)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(arch), attn_implementation="sdpa").eval()
    model.save_pretrained(folder, safe_serialization=True)
    return model


@pytest.fixture(scope="session", params=["llama", "qwen2", "mistral"])
def tiny_checkpoint(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny-{request.param}")
    model = save_tiny(request.param, folder)
    return request.param, folder, model


@pytest.fixture(scope="session")
def smollm2():
    """The bundled SmolLM2-135M-Instruct, loaded once per test session (float32, CPU)."""
    from kcache.models import loader

    return loader.load("smollm2", device="cpu")


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama with SmolLM2's real tokenizer and chat template: fast end-to-end runs of the CLI,
    engine and server (its text is gibberish; the bundled model is used where words matter)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    folder = tmp_path_factory.mktemp("tiny-chat")
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**TINY, "vocab_size": len(smollm2_tokenizer), "max_position_embeddings": 2048},
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(folder, safe_serialization=True)
    smollm2_tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    import importlib.util

    from transformers import AutoTokenizer

    from kcache.models.loader import BUNDLED_FILE, BUNDLED_PACKAGE

    folder = importlib.util.find_spec(BUNDLED_PACKAGE).submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(folder, gguf_file=BUNDLED_FILE)

"""`kcache generate` end to end, as a user runs it, and every bad input it must refuse in one line."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest


def kcache(*args, stdin=None, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "kcache", *args], input=stdin, capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_one_line_error(r, *words):
    assert r.returncode != 0
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("cache_args", [["--cache", "kcache", "--top-n", "32"], ["--cache", "full"],
                                        ["--cache", "kcache", "--kv-cache-dtype", "fp8", "--host-v-dtype", "fp8"]])
def test_chat_names_paris_with_stats(cache_args):
    r = kcache("generate", "--chat", "What is the capital of France?", "--max-new-tokens", "32", *cache_args)
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert ("kv_cache_dtype=fp8" in r.stderr) == ("--kv-cache-dtype" in cache_args)
    assert ("host_v_dtype=fp8" in r.stderr) == ("--host-v-dtype" in cache_args)
    for field in ("prompt tokens", "new tokens", "prefill seconds", "decode tokens/s", "device KV bytes", "host V bytes",
                  "attention mass kept"):
        assert field in r.stderr


def test_prompt_from_stdin_and_file(tiny_chat_model, tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("hello there")
    a = kcache("generate", "--model", str(tiny_chat_model), "--prompt-file", str(f), "--max-new-tokens", "5", "--ignore-eos")
    b = kcache("generate", "--model", str(tiny_chat_model), "--max-new-tokens", "5", "--ignore-eos", stdin="hello there")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and a.stdout.strip()
    assert "new tokens              5 (length)" in a.stderr


def test_missing_prompt_file():
    assert_one_line_error(kcache("generate", "--prompt-file", "/nonexistent/prompt.txt"), "cannot read prompt file")


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    assert_one_line_error(kcache("generate", "hi", "--model", str(tmp_path)), "unsupported architecture", "GPT2LMHeadModel")


def test_top_n_zero():
    assert_one_line_error(kcache("generate", "hi", "--top-n", "0"), "--top-n")


def test_host_v_dtype_without_a_host_pool():
    assert_one_line_error(kcache("generate", "hi", "--cache", "full", "--host-v-dtype", "fp8"), "host_v_dtype",
                          "full cache")


@pytest.mark.parametrize("chunk,words", [("6", ["chunk_tokens", "power of two"]),
                                         ("32", ["block_size (16) must be a multiple of chunk_tokens (32)"])])
def test_bad_chunk_tokens(chunk, words):
    r = kcache("generate", "hi", "--chunk-tokens", chunk)
    assert_one_line_error(r, *words)
    assert "Value error" not in r.stderr


def test_prompt_longer_than_context(tiny_chat_model):
    r = kcache("generate", "word " * 200, "--model", str(tiny_chat_model), "--max-model-len", "64")
    assert_one_line_error(r, "context is 64 tokens")


def test_unreadable_gguf(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(64))
    assert_one_line_error(kcache("generate", "hi", "--model", str(bad)), "cannot read GGUF file")


def test_missing_model():
    assert_one_line_error(kcache("generate", "hi", "--model", "/nonexistent/model"), "no such model")


def test_mistral_window_shorter_than_context(tmp_path):
    from conftest import save_tiny

    save_tiny("mistral", tmp_path)  # sliding window 512, context 1024
    assert_one_line_error(kcache("generate", "hi", "--model", str(tmp_path)), "sliding window")


def test_pools_larger_than_host_memory(tiny_chat_model):
    from kcache.engine.memory import available_host_bytes

    too_much = str(2 * available_host_bytes() / 2**30)  # GiB: each pool alone is twice what the machine has free
    r = kcache("generate", "hi", "--model", str(tiny_chat_model), "--device-cache-gb", too_much, "--host-cache-gb", too_much)
    assert_one_line_error(r, "GiB of host memory", "is available", "--host-cache-gb")

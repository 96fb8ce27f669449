"""`kcache bench` end to end on a tiny model: both modes, the ratio, the JSON, and KCache's larger batch."""
from __future__ import annotations

import json

from kcache.cli import main


def test_compare_writes_json_and_kcache_admits_more(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "bench.json"
    # 3 layers x 2 KV heads x 16 dims x 4 B = 384 B of K per token: a 96 KiB device pool holds 128 tokens of
    # FullKV (K and V) but 256 of KCache (K only), so KCache runs twice the 64-token sequences at once
    rc = main(["bench", "--model", str(tiny_chat_model), "--compare", "--input-len", "48", "--output-len", "16",
               "--num-prompts", "8", "--device-cache-gb", str(96 * 1024 / 2**30), "--host-cache-gb", "0.01",
               "--max-model-len", "64", "--output-json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "kcache/full" in printed and "decode_tokens_per_s" in printed and "decode_steps_overlapped" in printed
    table = [line for line in printed.splitlines() if line.startswith(("metric ", "full_batch_decode_tokens_per_s "))]
    assert len(table) == 2 and len({len(line) for line in table}) == 1  # the longest name still leaves the columns aligned
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"kcache", "full"}
    for mode in data["results"].values():
        assert mode["requests"] == 8 and mode["output_tokens_per_s"] > 0 and mode["p99_ttft_s"] >= mode["p50_ttft_s"]
        # every prompt token at least once (a preempted sequence is prefilled again)
        assert round(mode["prefill_tokens_per_s"] * mode["prefill_seconds"]) >= 8 * 48
        # steady state: 8 prompts of 16 tokens in waves of the largest batch, each wave 15 decode steps at full batch
        assert mode["full_batch_decode_steps"] >= 15 and mode["full_batch_decode_tokens_per_s"] > 0
        assert 1 <= mode["mean_decode_batch"] <= mode["max_concurrent_seqs"]
        assert mode["decode_steps_overlapped"] > 0  # async scheduling, the default, ran steps ahead
    assert data["results"]["full"]["max_concurrent_seqs"] == 2
    assert data["results"]["kcache"]["max_concurrent_seqs"] == 4
    assert data["kcache_over_full"]["max_concurrent_seqs"] == 2
    assert data["machine"]["cpu_count"] >= 1 and "bench" in data["command"]


def test_compare_with_an_fp8_host_v_gives_it_to_kcache_only(tiny_chat_model, tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_chat_model), "--compare", "--host-v-dtype", "fp8", "--input-len", "16",
               "--output-len", "4", "--num-prompts", "2", "--max-model-len", "64", "--output-json", str(out)])
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    kcache, full = results["kcache"], results["full"]
    assert kcache["host_pool_bytes"] == kcache["pool_tokens"] * 3 * 2 * 16  # 3 layers x 2 KV heads x 16 e4m3 bytes
    assert full["host_pool_bytes"] == 0 and kcache["requests"] == full["requests"] == 2


def test_book_prompts_are_windows_of_the_book(smollm2_tokenizer):
    from argparse import Namespace

    from kcache.bench.throughput import make_requests, read_dataset

    text = read_dataset("peter_pan")
    args = Namespace(seed=0, random_range_ratio=0.0, input_len=64, output_len=8, num_prompts=6, shared_prefix_len=0)
    requests = make_requests(args, text, len(smollm2_tokenizer), smollm2_tokenizer)
    book = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    twice = book + book  # a window may wrap around the end
    starts = set()
    for ids, out in requests:
        assert len(ids) == 64 and out == 8
        hits = [i for i in range(len(book)) if twice[i:i + 64] == ids]
        assert hits, "a prompt is not a window of the book's tokens"
        starts.add(hits[0])
    assert len(starts) == 6  # each prompt starts elsewhere
    assert requests == make_requests(args, text, len(smollm2_tokenizer), smollm2_tokenizer)  # the same in every mode


def test_bench_on_a_book(tiny_chat_model, tmp_path):
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(tiny_chat_model), "--dataset", "alice", "--input-len", "40", "--output-len", "4",
               "--num-prompts", "3", "--output-json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["args"]["dataset"] == "alice" and data["results"]["kcache"]["requests"] == 3


def test_bench_dataset_errors_are_one_line(tmp_path, capsys):
    for argv, words in (
        (["--model", "llama-3.1-8b", "--load-format", "dummy", "--dataset", str(tmp_path / "missing.txt")], "cannot read"),
        (["--model", "smollm2-135m", "--load-format", "dummy", "--dataset", "alice", "--num-prompts", "1",
          "--input-len", "8", "--output-len", "1", "--host-cache-gb", "0.1", "--device-cache-gb", "0.1"], "tokenizer"),
    ):
        assert main(["bench", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("kcache bench: error:") and words in err[0], err


def test_shared_prefix_workload_hits_the_cache_and_cuts_ttft(tiny_chat_model, tmp_path):
    out = tmp_path / "prefix.json"
    rc = main(["bench", "--model", str(tiny_chat_model), "--compare-prefix-caching", "--shared-prefix-len", "192",
               "--input-len", "8", "--output-len", "4", "--num-prompts", "4", "--block-size", "16",
               "--max-num-batched-tokens", "64", "--output-json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    cached, plain = data["results"]["kcache/prefix"], data["results"]["kcache/no-prefix"]
    # requests 2-4 find the 192 shared tokens (12 whole blocks) cached; without caching nothing is
    assert cached["prefix_cached_tokens_per_request"] == 192 * 3 / 4 and plain["prefix_cached_tokens_per_request"] == 0
    # the first prompt (192 + 8 tokens) is prefilled in full, the others only past the 12 shared blocks
    assert plain["prefill_tokens"] == 4 * 200 and cached["prefill_tokens"] == 200 + 3 * 8
    assert "mean_ttft_after_first_s" in data["ratios"]["kcache: prefix/none"]
    assert cached["requests"] == plain["requests"] == 4
    # float32 on the CPU: the cached prefix's K/V are the values a fresh prefill computes, so every greedy output agrees
    assert data["ratios"]["kcache: prefix/none"]["same_greedy_outputs"] == 1.0

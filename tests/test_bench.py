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
    assert "kcache/full" in printed and "decode_tokens_per_s" in printed
    table = [line for line in printed.splitlines() if line.startswith(("metric ", "full_batch_decode_tokens_per_s "))]
    assert len(table) == 2 and len({len(line) for line in table}) == 1  # the longest name still leaves the columns aligned
    data = json.loads(out.read_text())
    assert set(data["results"]) == {"kcache", "full"}
    for mode in data["results"].values():
        assert mode["requests"] == 8 and mode["output_tokens_per_s"] > 0 and mode["p99_ttft_s"] >= mode["p50_ttft_s"]
        # steady state: 8 prompts of 16 tokens in waves of the largest batch, each wave 15 decode steps at full batch
        assert mode["full_batch_decode_steps"] >= 15 and mode["full_batch_decode_tokens_per_s"] > 0
        assert 1 <= mode["mean_decode_batch"] <= mode["max_concurrent_seqs"]
    assert data["results"]["full"]["max_concurrent_seqs"] == 2
    assert data["results"]["kcache"]["max_concurrent_seqs"] == 4
    assert data["kcache_over_full"]["max_concurrent_seqs"] == 2
    assert data["machine"]["cpu_count"] >= 1 and "bench" in data["command"]

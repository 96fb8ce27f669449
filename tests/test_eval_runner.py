"""`kcache eval`: a --quick run end to end on a tiny random model with SmolLM2's tokenizer, the method specs and
the settings' precedence."""
from __future__ import annotations

import argparse
import json

import pytest
import yaml

from kcache.cli import main
from kcache.eval import runner
from kcache.eval.methods import parse_method, parse_task

# A budget above every length keeps every token with its exact weight: the full cache, computed the KCache way.
EVERYTHING = "kcache:top_n=4096:renormalize=false"
METHODS = f"full,{EVERYTHING},kcache:16,streaming:64,random:64"


@pytest.fixture(scope="module")
def quick(tiny_chat_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    assert main(["eval", "--quick", "--model", str(tiny_chat_model), "--out", str(out), "--methods", METHODS]) == 0
    results = json.loads((out / "results.json").read_text())
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return out, results, records


def test_writes_every_output(quick):
    out, results, records = quick
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["methods"] == METHODS.split(",") and config["lengths"] == runner.QUICK["lengths"]
    items = len(config["tasks"]) * len(config["lengths"]) * len(config["depths"]) * config["samples"]
    assert len(records) == items * len(config["methods"])
    assert set(results["methods"]) == set(config["methods"])
    table = (out / "results.md").read_text()
    assert "| method | N |" in table and "## Targets" in table
    pngs = ["accuracy_vs_n.png", "ppl_vs_n.png", "top1_vs_n.png"] + [f"heatmaps/{n}.png" for n in
                                                                      ("full", "kcache_16", "streaming_64", "random_64")]
    for name in pngs:
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_full_against_itself_is_exact(quick):
    _, results, _ = quick
    f = results["methods"]["full"]["fidelity"]["1024"]
    assert f["top1_agreement"] == 1.0 and f["ppl_ratio"] == 1.0 and f["mass_kept"] == 1.0
    assert f["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert f["greedy_agreement"] == 1.0


def test_budget_above_length_equals_full(quick):
    _, results, records = quick
    full = {(r["task"], r["depth"]): r["prediction"] for r in records if r["method"] == "full"}
    same = [r for r in records if r["method"] == EVERYTHING]
    assert {(r["task"], r["depth"]): r["prediction"] for r in same} == full
    assert all(r["first_diff_vs_full"] == 8 for r in same)
    f = results["methods"][EVERYTHING]["fidelity"]["1024"]
    assert f["top1_agreement"] == 1.0 and f["greedy_agreement"] == 1.0
    assert f["mean_kl"] < 1e-6 and f["ppl_ratio"] == pytest.approx(1.0, rel=1e-4)
    assert f["mass_kept"] == pytest.approx(1.0, abs=1e-5)
    assert results["methods"][EVERYTHING]["targets"]["met"]


def test_method_specs():
    s = parse_method("streaming:64")
    assert (s.kcache.top_n, s.kcache.sink_tokens, s.kcache.recent_tokens, s.budget, s.family) == (0, 4, 60, 64, "streaming")
    r = parse_method("random:32")
    assert (r.kcache.selection, r.kcache.top_n, r.family) == ("random", 32, "random")
    k = parse_method("kcache:top_n=64:renormalize=false:dense_layers=2")
    assert (k.kcache.top_n, k.kcache.renormalize, k.kcache.dense_layers) == (64, False, 2)
    assert k.family == "kcache:renormalize=false:dense_layers=2" and parse_method("kcache:16").family == "kcache"
    assert parse_method("full").config(30).dense_layers == 30
    assert parse_task("multihop:hops=2:chains=1").options == {"hops": 2, "chains": 1}
    plain = ("kcache", "auto", "auto", None)
    assert (parse_method("full").engine, parse_method("kcache:64").engine) == (plain, plain)
    f8 = parse_method("full:kv_cache_dtype=fp8")
    assert (f8.kcache, f8.engine, f8.family) == (None, ("full", "fp8", "auto", None), "full:kv_cache_dtype=fp8")
    k8 = parse_method("kcache:64:kv_cache_dtype=fp8")
    assert (k8.kcache.top_n, k8.engine, k8.family) == (64, ("kcache", "fp8", "auto", None), "kcache:kv_cache_dtype=fp8")
    v8 = parse_method("kcache:64:host_v_dtype=fp8")
    assert (v8.kcache.top_n, v8.engine, v8.family) == (64, ("kcache", "auto", "fp8", None), "kcache:host_v_dtype=fp8")
    plain8 = parse_method("full:kv_cache_dtype=fp8:fp8_exact_channels=0")
    assert plain8.engine == ("full", "fp8", "auto", 0) and plain8.family == "full:kv_cache_dtype=fp8:fp8_exact_channels=0"
    assert parse_method("kcache:64:kv_cache_dtype=fp8:fp8_exact_channels=8").engine == ("kcache", "fp8", "auto", 8)
    for bad in ("kcache:top_n=-1", "stream:64", "full:64", "streaming", "kcache:64:oops", "multikey:hops=2",
                "full:kv_cache_dtype=int8", "full:renormalize=false", "full:host_v_dtype=fp8",
                "kcache:host_v_dtype=fp4", "kcache:fp8_exact_channels=4", "full:kv_cache_dtype=fp8:fp8_exact_channels=17"):
        with pytest.raises(ValueError):
            (parse_task if bad.startswith("multi") else parse_method)(bad)


def test_flags_override_yaml_which_overrides_quick(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lengths: 300,600\nmethods: [full, 'kcache:8']\nppl_tokens: 7\n")
    parser = argparse.ArgumentParser()
    runner.add_arguments(parser)
    s = runner.resolve(parser.parse_args(["--quick", "--config", str(cfg), "--ppl-tokens", "9", "--depths", "0.5,1"]))
    assert s["lengths"] == [300, 600] and s["methods"] == ["full", "kcache:8"]
    assert s["ppl_tokens"] == 9 and s["depths"] == [0.5, 1.0] and s["tasks"] == runner.QUICK["tasks"]


def test_user_errors_are_one_line(tmp_path, capsys):
    assert main(["eval", "--methods", "kcache:top_n=0", "--out", str(tmp_path)]) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("lenghts: [1]\n")
    assert main(["eval", "--config", str(bad), "--out", str(tmp_path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "top_n" in lines[0] and "lenghts" in lines[1]


def test_fp8_methods_decode_from_pools_of_their_own(tiny_chat_model, tmp_path):
    """Each storage gets its own prefilled pools: on the FP8-K engine, KCache keeping every token equals exact
    attention over the same FP8 K; the FP8 caches (K, K and V, host V) differ from the reference, which stays
    exact."""
    everything, exact = f"{EVERYTHING}:kv_cache_dtype=fp8", "kcache:dense_layers=3:kv_cache_dtype=fp8"
    host_v = f"{EVERYTHING}:host_v_dtype=fp8"
    methods = ["full", "full:kv_cache_dtype=fp8", exact, everything, host_v]
    assert main(["eval", "--model", str(tiny_chat_model), "--out", str(tmp_path), "--task", "passkey", "--lengths",
                 "300", "--depths", "0.5", "--ppl-prefix", "256", "--ppl-tokens", "32", "--greedy-tokens", "4",
                 "--methods", *methods]) == 0
    results = json.loads((tmp_path / "results.json").read_text())["methods"]
    assert list(results) == methods
    assert [results[m]["kv_cache_dtype"] for m in methods] == ["auto", "fp8", "fp8", "fp8", "auto"]
    assert [results[m]["host_v_dtype"] for m in methods] == ["auto"] * 4 + ["fp8"]
    fid = {m: results[m]["fidelity"]["256"] for m in methods}
    assert fid["full"]["mean_kl"] == pytest.approx(0.0, abs=1e-12)
    assert fid["full:kv_cache_dtype=fp8"]["mean_kl"] > 0 and fid[exact]["mean_kl"] > 0  # FP8 rounding shows
    assert fid[everything]["mass_kept"] == pytest.approx(1.0, abs=1e-5)
    assert fid[host_v]["mass_kept"] == pytest.approx(1.0, abs=1e-5) and fid[host_v]["mean_kl"] > 0
    assert fid[everything]["perplexity"] == pytest.approx(fid[exact]["perplexity"], rel=1e-4)
    records = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(methods)

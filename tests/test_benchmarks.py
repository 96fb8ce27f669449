"""The scripts under benchmarks/ import, and their CPU-runnable parts run on tiny shapes, so that a change to the
engine cannot break a benchmark unseen; a script that needs Triton at import is checked where Triton is installed
(skipped where its import fails for want of Triton alone, so a new GPU script needs no list kept beside it)."""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("*.py"))


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import each other from their folder
    try:
        spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ModuleNotFoundError as e:
        if e.name != "triton":
            raise
        pytest.skip(f"{name} needs Triton: {e}")
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports(name):
    assert callable(load(name).main)


@pytest.mark.parametrize("script", sorted(p.name for p in BENCHMARKS.glob("*.sh")))
def test_shell_script_parses(script):
    """The device runs these in calls that cost minutes to start: a syntax error should cost none."""
    done = subprocess.run(["bash", "-n", str(BENCHMARKS / script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_batch1_vs_hf_times_both_on_the_cpu():
    b = load("batch1_vs_hf")
    assert b.kcache_decode_tok_s("smollm2-135m", 16, 3, "cpu", "float32", "full") > 0
    assert b.hf_decode_tok_s("smollm2-135m", 16, 3, "cpu", torch.float32) > 0


def test_tp_check_counts_agreeing_tokens():
    assert load("tp_check").agree([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]]) == [2, 2]


def test_plot_bench_plots_stored_results(tmp_path, monkeypatch):
    out = tmp_path / "bench.png"
    runs = sorted(str(p) for p in (BENCHMARKS / "results").glob("bench_h100_in*.json"))
    monkeypatch.setattr(sys, "argv", ["plot_bench.py", *runs, "-o", str(out)])
    load("plot_bench").main()
    assert out.stat().st_size > 0


def test_plot_bench_draws_one_prompt_length_as_a_bar_per_mode(tmp_path, monkeypatch):
    """Runs at a single prompt length: one bar per mode, each bar's height the run's own number."""
    results = BENCHMARKS / "results"
    paths = [str(results / f"bench_h100_pool48_{tag}_in32768_out64.json") for tag in ("chunk8", "fp8")]
    heights = []
    plot_bench = load("plot_bench")
    draw = plot_bench.plt.Axes.bar
    monkeypatch.setattr(plot_bench.plt.Axes, "bar", lambda ax, x, h, **kw: heights.append(list(h)) or draw(ax, x, h, **kw))
    monkeypatch.setattr(sys, "argv", ["plot_bench.py", *paths, "-o", str(tmp_path / "bars.png")])
    plot_bench.main()
    runs = [json.loads(open(p).read()) for p in paths]
    decode = [runs[0]["results"][m]["full_batch_decode_tokens_per_s"] for m in ("full", "kcache")]
    decode_fp8 = [runs[1]["results"][m]["full_batch_decode_tokens_per_s"] for m in ("full", "kcache")]
    assert heights[0] == [decode[0], decode_fp8[0], decode[1], decode_fp8[1]]  # FullKV, FullKV FP8, KCache, KCache FP8 K
    assert len(heights) == 2 and (tmp_path / "bars.png").stat().st_size > 0


def test_plot_bench_keeps_fp8_runs_apart_from_bf16_ones():
    """bf16 and FP8 runs at the same prompt length are separate lines, each point the run's own number."""
    results = BENCHMARKS / "results"
    paths = [results / "bench_h200_pool48_chunk8_in32768_out64.json", results / "bench_h200_pool48_fp8_in32768_out64.json"]
    runs = [json.loads(p.read_text()) for p in paths]
    lines = load("plot_bench").series(runs, "max_concurrent_seqs")
    assert set(lines) == {"FullKV", "FullKV FP8", "KCache N=64", "KCache N=64 FP8 K"}
    assert lines["KCache N=64 FP8 K"][32768] == runs[1]["results"]["kcache"]["max_concurrent_seqs"]
    assert lines["FullKV"][32768] == runs[0]["results"]["full"]["max_concurrent_seqs"]


def test_fp8_scale_probe_quantises_whole_blocks_and_measures_kl():
    p = load("fp8_scale_probe")
    g = torch.Generator().manual_seed(0)
    k = torch.randn(2 * p.BLOCK, 2, 8, generator=g)
    k[:, :, 0] = 10.0  # every row's largest magnitude is the same: one scale per block is one scale per row
    per_row = load("fp8_outlier_probe").per_row

    assert torch.equal(p.quantize_blocks(k), per_row(k))
    k[3] *= 100  # one loud token: its block's other rows lose precision under the shared scale
    assert (p.quantize_blocks(k) - k)[:p.BLOCK].norm() > (per_row(k) - k)[:p.BLOCK].norm()
    q = torch.randn(2 * p.BLOCK, 4, 8, generator=g)
    assert torch.allclose(p.causal_kl(q, k, k), torch.zeros(2, dtype=torch.float64))
    assert (p.causal_kl(q, k, p.quantize_blocks(k)) > 0).all()


def test_fp8_outlier_probe_reads_its_variants_and_refuses_unknown_storages():
    variants = load("fp8_outlier_probe").variants
    assert variants("head:1,channels:4") == [("head", 1), ("channels", 4)]
    with pytest.raises(argparse.ArgumentTypeError, match="unknown storage"):
        variants("head:1,int8:4")


def test_compile_sm90_shows_the_fp8_scan_in_as_many_tensor_core_ops_as_the_bf16_one():
    """The offline sm_90 compile reports registers and instruction counts; the FP8 scan's e4m3 tile goes into one
    fp16 dot, so its loop holds the bf16 scan's HMMA count (two e4m3 query parts had doubled it)."""
    tool = load("compile_sm90")
    counts = {}
    for name in ("scan fp8e4nv", "scan bf16"):
        fn, signature, constexprs, warps, stages = tool.kernels()[name]
        counts[name] = tool.summary(tool.compile_sm90(fn, signature, constexprs, warps, stages))
    assert all(c["registers"] > 0 and c["HMMA"] > 0 for c in counts.values())
    assert counts["scan fp8e4nv"]["HMMA"] == counts["scan bf16"]["HMMA"]

"""Plot `kcache bench --compare` results: decode tokens/s and the largest batch against prompt length.

Usage: python benchmarks/plot_bench.py benchmarks/results/bench_h100_*.json -o benchmarks/results/bench_h100.png
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load(paths):
    runs = sorted((json.load(open(p)) for p in paths), key=lambda d: d["args"]["input_len"])
    return runs, runs[0]["machine"].get("card", "CPU")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    runs, card = load(args.results)
    lengths = [r["args"]["input_len"] for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for mode, style in (("full", "o-"), ("kcache", "s-")):
        label = "FullKV" if mode == "full" else f"KCache N={runs[0]['results']['kcache']['kcache']['top_n']}"
        axes[0].plot(lengths, [r["results"][mode]["decode_tokens_per_s"] for r in runs], style, label=label)
        axes[1].plot(lengths, [r["results"][mode]["max_concurrent_seqs"] for r in runs], style, label=label)
    for ax, title in zip(axes, ("steady-state decode tokens/s", "largest concurrent batch")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [f"{n // 1024}k" for n in lengths])
        ax.set_xlabel("prompt tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Llama-3.1-8B shapes (random weights), bf16, {card}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)


if __name__ == "__main__":
    main()

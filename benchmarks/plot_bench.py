"""Plot `kcache bench` results: decode tokens/s and the largest batch against prompt length, one line per mode
(FullKV, KCache at each N found); bars by mode where the results hold one prompt length.

Usage: python benchmarks/plot_bench.py benchmarks/results/bench_h100_*.json -o benchmarks/results/bench_h100.png
"""
from __future__ import annotations

import argparse
import json

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def label(args: dict, mode: str, res: dict) -> str:
    """FullKV | KCache N=<n>, with the pools' FP8 settings (runs before FP8 existed have none)."""
    fp8_k = args.get("kv_cache_dtype") == "fp8"
    if mode == "full":
        return "FullKV" + (" FP8" if fp8_k else "")
    return (f"KCache N={res['kcache']['top_n']}" + (" FP8 K" if fp8_k else "")
            + (" FP8 host V" if args.get("host_v_dtype") == "fp8" else ""))


def series(runs: list[dict], metric: str) -> dict[str, dict[int, float]]:
    """{label: {prompt tokens: value}} over every mode of every run (first value wins)."""
    out: dict[str, dict[int, float]] = {}
    for run in runs:
        for mode, res in run["results"].items():
            out.setdefault(label(run["args"], mode, res), {}).setdefault(run["args"]["input_len"], res[metric])
    return dict(sorted(out.items(), key=lambda kv: (kv[0] != "FullKV", len(kv[0]), kv[0])))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("results", nargs="+", help="bench JSON files (--compare runs, or single-mode runs at other N)")
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    runs = [json.load(open(path)) for path in args.results]
    card = runs[0]["machine"].get("card", "CPU")
    # steady state where the results have it; older runs averaged every decode step
    steady = all("full_batch_decode_tokens_per_s" in res for r in runs for res in r["results"].values())
    metric = "full_batch_decode_tokens_per_s" if steady else "decode_tokens_per_s"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], metric, "decode tokens/s " + ("(steady state)" if steady else "(all decode steps)")),
                           (axes[1], "max_concurrent_seqs", "largest concurrent batch")):
        lines = series(runs, key)
        every = sorted({r["args"]["input_len"] for r in runs})
        if len(every) == 1:  # one prompt length: a bar per mode, its value on it
            bars = ax.bar(range(len(lines)), [points[every[0]] for points in lines.values()])
            ax.bar_label(bars, fmt="%.0f")
            ax.set_xticks(range(len(lines)), list(lines), rotation=25, ha="right")
            ax.set_xlabel(f"{every[0] // 1024}k prompt tokens")
        else:
            for (name, points), marker in zip(lines.items(), "osD^v<>"):
                lengths = sorted(points)
                ax.plot(lengths, [points[n] for n in lengths], marker + "-", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(every, [f"{n // 1024}k" for n in every])
            ax.set_xlabel("prompt tokens")
            ax.legend()
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.suptitle(f"Llama-3.1-8B shapes (random weights), bf16 weights, {card}")
    fig.tight_layout()
    fig.savefig(args.output, dpi=120)


if __name__ == "__main__":
    main()

"""What `kcache eval` writes: the results summary, its markdown tables and the plots.

Every method is judged against the full cache (the first method of a run) by the targets of the accuracy issue:
it answers every item the full cache answers, its perplexity is within 1% of the full cache's and its
teacher-forced top-1 agreement is at least 98%. Items the full cache gets wrong do not count against a method.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from pathlib import Path

from kcache.eval.metrics import summarize

log = logging.getLogger("kcache")

TARGET_PPL_RATIO = 1.01
TARGET_TOP1 = 0.98


def _item_key(r: dict) -> tuple:
    return r["task"], r["length"], r["depth"], r["sample"]


def task_results(records: list[dict], full: str) -> dict:
    """{method: {task: {correct, total, accuracy, missed_vs_full, by_length: {length: summary}}}}."""
    solved = {_item_key(r): r["correct"] for r in records if r["method"] == full}
    grouped = defaultdict(lambda: defaultdict(list))
    for r in records:
        grouped[r["method"]][r["task"]].append(r)
    out = {}
    for method, tasks in grouped.items():
        out[method] = {}
        for task, rs in tasks.items():
            by_length = defaultdict(list)
            for r in rs:
                by_length[r["length"]].append(r["correct"])
            out[method][task] = {
                **summarize(r["correct"] for r in rs),
                "missed_vs_full": sum(solved[_item_key(r)] and not r["correct"] for r in rs),
                "by_length": {str(n): summarize(c) for n, c in sorted(by_length.items())},
            }
    return out


def targets(tasks: dict | None, fidelity: dict | None) -> dict:
    """Which targets a method meets; None where the run did not measure it."""
    same = None if tasks is None else all(t["missed_vs_full"] == 0 for t in tasks.values())
    ppl = None if fidelity is None else all(f["ppl_ratio"] <= TARGET_PPL_RATIO for f in fidelity.values())
    top1 = None if fidelity is None else all(f["top1_agreement"] >= TARGET_TOP1 for f in fidelity.values())
    return {"same_items_as_full": same, "ppl_within_1pct": ppl, "top1_at_least_98pct": top1,
            "met": same is True and ppl is True and top1 is True}


def cost(m: dict) -> tuple:
    """Cheapest first: fewest V rows read per KV head and layer, then fewest exact (device-V) layers."""
    return m["v_rows"], m["kcache"]["dense_layers"]


def recommend(methods: dict) -> str | None:
    passing = [(cost(m), name) for name, m in methods.items() if m["kcache"] is not None and m["targets"]["met"]]
    return min(passing)[1] if passing else None


# ---- markdown ----------------------------------------------------------------------------------------------

def _budget(m: dict) -> str:
    return "all" if m["budget"] is None else str(m["budget"])


def _check(v) -> str:
    return {True: "yes", False: "**no**", None: "-"}[v]


def _table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(map(str, r)) + " |" for r in rows]


def markdown(results: dict) -> str:
    s, methods = results["settings"], results["methods"]
    lines = [f"# kcache eval: {s['model']}", ""]
    if results.get("command"):
        lines += [f"`{results['command']}`", ""]
    lines += [f"Device {results['device']}, {results['seconds'] / 60:.1f} min. Settings: `config.yaml`; "
              "per-item outputs: `predictions.jsonl`. N = V rows read per KV head (per query head with "
              "selection=head) and layer at each decode step.", ""]
    for task in s["tasks"]:
        lengths = sorted({n for m in methods.values() for n in m["tasks"].get(task, {}).get("by_length", {})}, key=int)
        if not lengths:
            continue
        lines += [f"## {task}: correct / total", ""]
        rows = []
        for name, m in methods.items():
            t = m["tasks"][task]
            rows.append([f"`{name}`", _budget(m)] + [f"{t['by_length'][n]['correct']}/{t['by_length'][n]['total']}"
                                                     for n in lengths] + [f"{t['correct']}/{t['total']}", t["missed_vs_full"]])
        lines += _table(["method", "N"] + [f"{n} tok" for n in lengths] + ["all", "missed vs full"], rows) + [""]
    for prefix in s["ppl_prefix"] if s["ppl_tokens"] else []:
        key = str(prefix)
        lines += [f"## Fidelity: `{s['ppl_text']}`, {s['ppl_tokens']} tokens teacher-forced after {prefix} tokens", ""]
        rows = []
        for name, m in methods.items():
            f = m["fidelity"][key]
            greedy = f"{f['greedy_agreement']:.2f} ({f['greedy_first_diff']})" if f["greedy_first_diff"] is not None else "-"
            rows.append([f"`{name}`", _budget(m), f"{f['perplexity']:.3f}", f"{f['ppl_ratio']:.4f}",
                         f"{f['top1_agreement']:.4f}", f"{f['mean_kl']:.5f}", f"{f['mass_kept']:.3f}", greedy])
        lines += _table(["method", "N", "perplexity", "x full", "top-1 agreement", "mean KL (nats)", "mass kept",
                         f"greedy agreement, {s['greedy_tokens']} tok (first diff)"], rows) + [""]
    lines += ["## Targets", "",
              f"Same items answered as the full cache (every item it solves), perplexity within "
              f"{(TARGET_PPL_RATIO - 1) * 100:.0f}% and top-1 agreement >= {TARGET_TOP1:.0%} at every prefix.", ""]
    rows = []
    for name, m in list(methods.items())[1:]:  # all but the reference, the first
        t = m["targets"]
        rows.append([f"`{name}`", _budget(m), _budget(m) if m["v_rows"] is None else m["v_rows"],
                     _check(t["same_items_as_full"]),
                     _check(t["ppl_within_1pct"]), _check(t["top1_at_least_98pct"]), _check(t["met"])])
    lines += _table(["method", "N", "V rows", "same items", "perplexity", "top-1", "all met"], rows) + [""]
    best = results["recommended"]
    lines.append(f"Cheapest setting meeting every target: `{best}`." if best else
                 "No setting met every target: see the curves against N and pick the knee.")
    return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------------------

def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_")


def plots(results: dict, records: list[dict], out: Path) -> list[Path]:
    """Needle heatmaps per method, accuracy / perplexity / top-1 agreement against N; [] without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        log.warning("matplotlib is not installed (pip install 'kcache[plot]'): no plots")
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if records:
        (out / "heatmaps").mkdir(exist_ok=True)
        for name in results["methods"]:
            written.append(_heatmap(plt, [r for r in records if r["method"] == name], name,
                                    out / "heatmaps" / f"{slug(name)}.png"))
        tasks = list(results["settings"]["tasks"])
        written.append(_curves(plt, results, tasks, lambda m, t: m["tasks"][t]["accuracy"], "accuracy (all lengths)",
                               out / "accuracy_vs_n.png", ylim=(-0.03, 1.03)))
    if results["settings"]["ppl_tokens"]:
        prefixes = [str(p) for p in results["settings"]["ppl_prefix"]]
        # The excess over the full cache on a log axis: 1% and 100x both stay readable.
        written.append(_curves(plt, results, prefixes, lambda m, p: m["fidelity"][p]["ppl_ratio"] - 1,
                               "perplexity / full - 1", out / "ppl_vs_n.png", log_y=True, title="prefix {} tokens",
                               target=TARGET_PPL_RATIO - 1, show_full=False))
        written.append(_curves(plt, results, prefixes, lambda m, p: m["fidelity"][p]["top1_agreement"],
                               "top-1 agreement with full", out / "top1_vs_n.png", title="prefix {} tokens",
                               target=TARGET_TOP1, ylim=(0, 1.02)))
    return written


def _heatmap(plt, records: list[dict], name: str, path: Path) -> Path:
    """Accuracy over length x depth, one panel per task."""
    tasks = list(dict.fromkeys(r["task"] for r in records))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks), 3.0), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        rs = [r for r in records if r["task"] == task]
        lengths = sorted({r["length"] for r in rs})
        depths = sorted({r["depth"] for r in rs})
        cells = defaultdict(list)
        for r in rs:
            cells[r["length"], r["depth"]].append(r["correct"])
        grid = [[sum(cells[n, d]) / len(cells[n, d]) for d in depths] for n in lengths]
        ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{v:.2f}".rstrip("0").rstrip("."), ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("needle depth")
        ax.set_ylabel("context tokens")
        ax.set_title(task, fontsize=9)
    fig.suptitle(name, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _curves(plt, results: dict, panels: list[str], value, ylabel: str, path: Path, log_y: bool = False,
            ylim=None, title: str = "{}", target: float | None = None, show_full: bool = True) -> Path:
    """One panel per task or prefix: a line per method family over the budget N, the full cache dashed and the
    target (if any) dotted."""
    methods = results["methods"]
    families = defaultdict(list)
    for m in methods.values():
        families[m["family"]].append(m)
    budgets = sorted({m["budget"] for m in methods.values() if m["budget"] is not None})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels) + 1.6, 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for i, (family, ms) in enumerate(families.items()):
            if ms[0]["budget"] is None:  # a full cache: a level, not a curve over N
                if show_full or family != "full":
                    ax.axhline(value(ms[0], panel), color="black" if family == "full" else f"C{i}",
                               linestyle="--" if family == "full" else "-.", linewidth=1, label=family)
                continue
            ms = sorted(ms, key=lambda m: m["budget"])
            ax.plot([m["budget"] for m in ms], [value(m, panel) for m in ms], marker="osD^v<>"[i % 7], markersize=4,
                    linewidth=1.2, alpha=0.85, label=family)
        if target is not None:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1.2, label="target")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(b) for b in budgets], fontsize=7)
        ax.minorticks_off()
        if log_y:
            ax.set_yscale("log")
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_xlabel("N (V rows per KV head per step)")
        ax.set_ylabel(ylabel)
        ax.set_title(title.format(panel), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

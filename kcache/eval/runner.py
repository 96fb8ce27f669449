"""`kcache eval`: retrieval tasks and fidelity metrics, every method against the full cache in one run.

    kcache eval --quick --out eval-quick
    kcache eval --task passkey needle --lengths 1024 2048 --depths 0.1 0.5 0.9 \\
        --methods full,kcache:64,kcache:16:renormalize=false,streaming:64,random:64 --out eval-out
    kcache eval --config docs/accuracy/sweep.yaml --out eval-sweep

Settings come from the defaults, then --quick's small grid, then --config's YAML, then the flags given. The
resolved settings are written to OUT/config.yaml, which --config reads back to rerun. Each prompt is prefilled
once (exactly) per engine and every method decodes from its engine's cache (kcache.eval.harness): one engine for
the methods in the model's dtype, one per other storage (`kv_cache_dtype=fp8`: KCache with FP8 K, or the FP8
FullKV; `host_v_dtype=fp8`: KCache with FP8 host V). Outputs: config.yaml,
predictions.jsonl (one line per item and method), results.json, results.md and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from kcache.cli import CLIError, non_negative_int, positive_int
from kcache.eval.methods import Method, parse_method, parse_task

log = logging.getLogger("kcache")

DEFAULTS = dict(
    tasks=["passkey", "needle", "multikey:keys=2", "multihop:hops=2:chains=1"],
    lengths=[1024, 2048, 4096],
    depths=[0.0, 0.25, 0.5, 0.75, 1.0],
    samples=1,
    methods=["full", "kcache:top_n=16", "kcache:top_n=64", "kcache:top_n=256", "streaming:64", "random:64"],
    model="smollm2",
    dtype="auto",
    device="auto",
    max_model_len=None,
    seed=0,
    haystack_file=None,
    ppl_text="sherlock",
    ppl_prefix=[2048],
    ppl_tokens=512,
    greedy_tokens=32,
)
QUICK = dict(
    tasks=["passkey", "needle"],
    lengths=[1024],
    depths=[0.2, 0.8],
    methods=["full", "kcache:top_n=16", "kcache:top_n=64", "streaming:64", "random:64"],
    ppl_prefix=[1024],
    ppl_tokens=128,
    greedy_tokens=16,
)
LISTS = {"tasks": str, "lengths": int, "depths": float, "methods": str, "ppl_prefix": int}
MAX_BATCH = 16  # items decoded together: one read of the weights per step serves them all


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML settings, keys as the long options (ppl_prefix, ...); "
                   "options given on the command line override it")
    p.add_argument("--quick", action="store_true", help="a small grid that finishes in a few minutes on a 2-core CPU")
    p.add_argument("--out", type=Path, default=Path("kcache-eval"), help="output folder (default: kcache-eval)")
    g = p.add_argument_group("tasks (lists: space- or comma-separated)")
    g.add_argument("--task", "--tasks", dest="tasks", nargs="+", metavar="TASK",
                   help="passkey, needle, multikey[:keys=K], multihop[:hops=H:chains=C]")
    g.add_argument("--lengths", nargs="+", metavar="N", help="prompt lengths in tokens (capped at the context minus the answer)")
    g.add_argument("--depths", nargs="+", metavar="D", help="needle depths in [0, 1]")
    g.add_argument("--samples", type=positive_int, help="items per (task, length, depth)")
    g.add_argument("--haystack-file", help="a text file of prose for the haystack (default: the shipped books)")
    g.add_argument("--methods", nargs="+", metavar="SPEC", help="full, kcache[:N][:key=value...], streaming:N, "
                   "random:N; e.g. full,kcache:top_n=64,kcache:top_n=16:renormalize=false,streaming:64,random:64")
    f = p.add_argument_group("fidelity against the full cache")
    f.add_argument("--ppl-text", help="a shipped book (alice, peter_pan, sherlock) or a text file")
    f.add_argument("--ppl-prefix", nargs="+", metavar="N", help="tokens prefilled exactly before the scored ones")
    f.add_argument("--ppl-tokens", type=non_negative_int, help="tokens scored teacher-forced in decode mode (0: skip)")
    f.add_argument("--greedy-tokens", type=non_negative_int, help="free-running greedy tokens compared with the full cache")
    m = p.add_argument_group("model")
    m.add_argument("--model", help="'smollm2' (bundled), a Hugging Face folder or a .gguf file")
    m.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    m.add_argument("--device", help="auto, cpu, cuda, cuda:1 ...")
    m.add_argument("--max-model-len", type=positive_int, help="context length (default: the model's)")
    m.add_argument("--seed", type=int, help="task generation and the random baseline")
    p.add_argument("-v", "--verbose", action="store_true", help="log the pool sizes and other engine details")


# ---- settings ----------------------------------------------------------------------------------------------

def _as_list(key: str, value) -> list:
    """A list setting from YAML or flags: lists, or comma-separated strings, of LISTS[key]."""
    items = value if isinstance(value, list) else [value]
    parts = [p for v in items for p in (v.split(",") if isinstance(v, str) else [v])]
    try:
        return [LISTS[key](p.strip() if isinstance(p, str) else p) for p in parts if p != ""]
    except ValueError:
        raise CLIError(f"{key}: expected a list of {LISTS[key].__name__}, got {value!r}") from None


def read_config(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise CLIError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise CLIError(f"{path}: expected a mapping of settings")
    unknown = set(data) - set(DEFAULTS)
    if unknown:
        raise CLIError(f"{path}: unknown settings {', '.join(sorted(unknown))}")
    return data


def resolve(args) -> dict:
    given = {k: getattr(args, k) for k in DEFAULTS if getattr(args, k, None) is not None}
    s = {**DEFAULTS, **(QUICK if args.quick else {}), **(read_config(args.config) if args.config else {}), **given}
    for key in LISTS:
        s[key] = _as_list(key, s[key])
    if not s["methods"]:
        raise CLIError("no methods given")
    if s["tasks"] and not (s["lengths"] and s["depths"]):
        raise CLIError("tasks need lengths and depths")
    if any(n < 1 for n in s["lengths"]) or any(not 0 <= d <= 1 for d in s["depths"]):
        raise CLIError("lengths must be positive and depths within [0, 1]")
    if s["ppl_tokens"] and any(n < 1 for n in s["ppl_prefix"]):
        raise CLIError("ppl_prefix must be positive")
    return s


def methods_from(specs: list[str]) -> list[Method]:
    """Parsed methods, duplicates dropped, the full cache in the model's dtype first (every comparison is against
    it)."""
    try:
        methods = [parse_method(s) for s in dict.fromkeys(s.strip() for s in specs)]
    except ValueError as e:
        raise CLIError(str(e)) from None
    reference = next((m for m in methods if m.kcache is None and m.kv_cache_dtype == "auto"), parse_method("full"))
    return [reference] + [m for m in methods if m is not reference]


def by_engine(harnesses: dict, methods: list[Method]):
    """(harness, its methods) per engine, the reference's engine first."""
    return [(h, [m for m in methods if m.engine == key]) for key, h in harnesses.items()]


# ---- running -----------------------------------------------------------------------------------------------

def make_items(tokenizer, s: dict, max_model_len: int) -> list[tuple[str, int, object]]:
    """(task spec, sample index, Item) over the grid, lengths capped so the answer fits in the context."""
    from kcache.eval.tasks import Item, generate

    cap = max_model_len - Item.max_new_tokens
    lengths = sorted({min(n, cap) for n in s["lengths"]})
    if any(n > cap for n in s["lengths"]):
        log.warning("lengths capped at %d tokens: the context minus the answer's %d", cap, Item.max_new_tokens)
    try:
        specs = [parse_task(t) for t in s["tasks"]]
        out = []
        for spec in specs:
            items = generate(spec.task, tokenizer, lengths, s["depths"], s["samples"], s["seed"], s["haystack_file"],
                             **spec.options)
            out += [(spec.name, i % s["samples"], item) for i, item in enumerate(items)]
    except ValueError as e:
        raise CLIError(str(e)) from None
    return out


def _batches(items: list, pool_tokens: int):
    """Items of one length (whatever their task), as many at a time as the pool holds, at most MAX_BATCH."""
    batch: list = []
    for entry in sorted(items, key=lambda e: e[2].length):
        item = entry[2]
        size = max(1, min(MAX_BATCH, pool_tokens // (item.length + 2 * item.max_new_tokens)))
        if len(batch) >= size or (batch and batch[0][2].length != item.length):
            yield batch
            batch = []
        batch.append(entry)
    if batch:
        yield batch


def run_tasks(harnesses: dict, items: list, methods: list[Method], seed: int, bar, sink) -> list[dict]:
    """Every method on every item, each batch of items prefilled once per engine; one record per (item, method)."""
    import torch

    eng, records = next(iter(harnesses.values())).engine, []
    pool = min(h.engine.blocks.num_free * h.engine.blocks.block_size for h in harnesses.values())
    for batch in _batches(items, pool):
        prompts = [eng.encode(item.prompt) for _, _, item in batch]
        max_new = max(item.max_new_tokens for _, _, item in batch)
        reference = None
        for harness, group in by_engine(harnesses, methods):
            bar.set_postfix_str(f"prefill {len(batch)} x {batch[0][2].length} tokens")
            with harness.prefilled(prompts) as (seqs, logits):
                first = logits.argmax(-1).tolist()
                for m in group:
                    bar.set_postfix_str(m.name)
                    torch.manual_seed(seed)  # the random baseline draws the same tokens on every rerun
                    outs, mass = harness.greedy(seqs, prompts, first, m.config(harness.num_layers), max_new)
                    if reference is None:  # the full cache comes first
                        reference = outs
                    records += _task_records(eng.tokenizer, batch, prompts, m, outs, mass, reference, sink)
                    bar.update(len(batch))
    return records


def _task_records(tokenizer, batch, prompts, m: Method, outs, mass, reference, sink) -> list[dict]:
    """One record per item of the batch for method m, each also written to sink."""
    from kcache.eval.metrics import greedy_agreement
    from kcache.eval.tasks import answer_correct

    records = []
    for (task, sample, item), prompt, toks, kept, ref in zip(batch, prompts, outs, mass, reference):
        text = tokenizer.decode(toks, skip_special_tokens=True)
        rec = dict(task=task, length=item.length, depth=item.depth, sample=sample, n_tokens=len(prompt),
                   method=m.name, answer=item.answer, prediction=text, correct=answer_correct(text, item.answer),
                   mass_kept=round(kept, 5), first_diff_vs_full=greedy_agreement(toks, ref)[0])
        sink.write(json.dumps(rec) + "\n")
        records.append(rec)
    sink.flush()
    return records


def text_ids(tokenizer, source: str, need: int) -> list[int]:
    from kcache.eval.haystack import read_text

    ids = tokenizer(read_text(source), verbose=False)["input_ids"]
    if len(ids) < need:
        raise CLIError(f"{source} has {len(ids)} tokens; the fidelity metrics need {need}")
    return ids[:need]


def run_fidelity(harnesses: dict, s: dict, methods: list[Method], bar) -> dict:
    """{prefix: {method: metrics}}: teacher-forced perplexity, top-1 agreement, KL and mass kept against the full
    cache over ppl_tokens tokens after each prefix, and free-running greedy agreement over greedy_tokens."""
    import torch

    from kcache.eval.metrics import greedy_agreement, mean_kl, perplexity, top1_agreement

    eng, n, out = next(iter(harnesses.values())).engine, s["ppl_tokens"], {}
    longest = max(p + max(n + 1, s["greedy_tokens"]) for p in s["ppl_prefix"])
    if longest > eng.max_model_len:
        raise CLIError(f"ppl_prefix + ppl_tokens needs {longest} tokens; the context is {eng.max_model_len}")
    all_ids = text_ids(eng.tokenizer, s["ppl_text"], longest)
    for prefix in s["ppl_prefix"]:
        ids = all_ids[:prefix + n + 1]
        targets = torch.tensor(ids[prefix + 1:])
        rows, ref = {}, None
        for harness, group in by_engine(harnesses, methods):
            with harness.prefilled([ids[:prefix]]) as (seqs, logits):
                first = [int(logits[0].argmax())]
                for m in group:
                    torch.manual_seed(s["seed"])
                    cfg = m.config(harness.num_layers)
                    scored, mass = harness.score(seqs[0], ids, prefix, cfg)
                    cont = harness.greedy(seqs, [ids[:prefix]], first, cfg, s["greedy_tokens"])[0][0]
                    ppl = perplexity(scored, targets)
                    if ref is None:  # the full cache comes first
                        ref = dict(logits=scored, cont=cont, ppl=ppl)
                    diff, share = greedy_agreement(cont, ref["cont"]) if s["greedy_tokens"] else (None, None)
                    rows[m.name] = dict(perplexity=ppl, ppl_ratio=ppl / ref["ppl"],
                                        top1_agreement=top1_agreement(scored, ref["logits"]),
                                        mean_kl=mean_kl(ref["logits"], scored), mass_kept=mass.double().mean().item(),
                                        greedy_first_diff=diff, greedy_agreement=share)
                    bar.update(1)
        out[str(prefix)] = {m.name: rows[m.name] for m in methods}  # in the methods' order
    return out


def summarize_run(s: dict, methods: list[Method], records: list[dict], fidelity: dict, model_cfg, device: str,
                  seconds: float) -> dict:
    from kcache.eval import report

    tasks = report.task_results(records, methods[0].name) if records else {}
    group = model_cfg.num_heads // model_cfg.num_kv_heads
    out = {}
    for m in methods:
        cfg = m.kcache
        per_kv_head = None if cfg is None else cfg.budget * (group if cfg.selection == "head" else 1)
        fid = {p: rows[m.name] for p, rows in fidelity.items()} if fidelity else None
        out[m.name] = dict(family=m.family, budget=m.budget, v_rows=per_kv_head, kv_cache_dtype=m.kv_cache_dtype,
                           host_v_dtype=m.host_v_dtype, fp8_exact_channels=m.fp8_exact_channels,
                           kcache=None if cfg is None else cfg.model_dump(), tasks=tasks.get(m.name, {}),
                           fidelity=fid or {}, targets=report.targets(tasks.get(m.name) if records else None, fid))
    return dict(settings=s, device=device, seconds=seconds, methods=out, recommended=report.recommend(out))


def run(args) -> int:
    import torch
    from tqdm.auto import tqdm

    from kcache.config import KCacheConfig
    from kcache.eval import report
    from kcache.eval.harness import Harness
    from kcache.llm import LLM

    s = resolve(args)
    methods = methods_from(s["methods"])
    s["methods"] = [m.name for m in methods]
    # One engine per (cache, kv_cache_dtype, host_v_dtype, fp8_exact_channels) the methods need, the reference's first. KCache's keeps V of every layer
    # in the host pool; each method then sets cache.kcfg (the full cache: all layers exact). Eager decode: a CUDA
    # graph would replay the setting it was captured with, whatever cache.kcfg says.
    harnesses = {}
    for key in dict.fromkeys(m.engine for m in methods):
        cache, kv_cache_dtype, host_v_dtype, exact = key
        llm = LLM(s["model"], cache=KCacheConfig() if cache == "kcache" else cache, dtype=s["dtype"],
                  device=s["device"], max_model_len=s["max_model_len"], seed=s["seed"], enforce_eager=True,
                  kv_cache_dtype=kv_cache_dtype, host_v_dtype=host_v_dtype,
                  **({} if exact is None else {"fp8_exact_channels": exact}))
        harnesses[key] = Harness(llm.engine)
    eng = next(iter(harnesses.values())).engine
    if eng.tokenizer is None:
        raise CLIError("this model has no tokenizer files; the tasks need text")
    items = make_items(eng.tokenizer, s, eng.max_model_len)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    _write_yaml(out / "config.yaml", s)
    t0 = time.perf_counter()
    steps = len(items) * len(methods) + (len(s["ppl_prefix"]) * len(methods) if s["ppl_tokens"] else 0)
    with tqdm(total=steps, desc="eval", unit="run") as bar, open(out / "predictions.jsonl", "w") as sink:
        records = run_tasks(harnesses, items, methods, s["seed"], bar, sink)
        fidelity = run_fidelity(harnesses, s, methods, bar) if s["ppl_tokens"] else {}
    results = summarize_run(s, methods, records, fidelity, eng.model_config, str(eng.device),
                            time.perf_counter() - t0)
    results.update(command=getattr(args, "command_line", None), torch_threads=torch.get_num_threads())
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report.markdown(results))
    report.plots(results, records, out)
    print(f"kcache eval: wrote {out}/results.md; recommended: {results['recommended'] or 'none met every target'}",
          file=sys.stderr)
    return 0


def _write_yaml(path: Path, data: dict) -> None:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))

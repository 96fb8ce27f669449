"""Compile the decode kernels for an H100/H200 (sm_90) on a machine without a GPU, and print what decides their speed:
registers per thread (programs per SM), and the instructions of the compiled code (tensor-core ops, exponentials,
shuffles, barriers, async copies). Device time is scarce; this costs none.

Arguments are specialised as Triton's JIT specialises them on the GPU: pointers 16-byte aligned, the integer
arguments named in ALIGNED divisible by 16. The compiler, ptxas, cuobjdump and nvdisasm all come with the Triton
wheel.

    python benchmarks/compile_sm90.py [--dump DIR] [--table tile] [--scan-stages 3]  # as launched, or with other settings
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kcache.attention import triton_decode as td

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
ALIGNED = ("max_blocks", "per_split", "LC")
COUNTED = {"HMMA": r"\bHMMA", "MUFU": r"\bMUFU", "SHFL": r"\bSHFL", "BAR": r"\bBAR\.SYNC", "LDGSTS": r"\bLDGSTS",
           "LDG": r"\bLDG\.", "LDS": r"\bLDS", "STS": r"\bSTS", "STG": r"\bSTG"}


def compile_sm90(fn, signature: dict, constexprs: dict, num_warps: int, num_stages: int):
    names = list(fn.arg_names)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items()
             if t.startswith("*") or n in ALIGNED}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constexprs}}, constexprs=constexprs,
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=num_stages))


def summary(kernel) -> dict:
    """Registers per thread and counts of the SASS instructions in COUNTED (static counts: the loop body once)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([f"{TOOLS}/cuobjdump", "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
        sass = subprocess.run([f"{TOOLS}/nvdisasm", "-c", f.name], capture_output=True, text=True, check=True).stdout
    ops = [line for line in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    buffers = re.findall(r"memdesc<(\d+)x\d+x\d+xf8E4M3FN|memdesc<(\d+)x\d+x\d+xbf16", kernel.asm["ttgir"])
    row = {"registers": int(re.search(r"REG:(\d+)", usage).group(1)), "instructions": len(ops),
           "K buffers": max((int(a or b) for a, b in buffers), default=0)}
    row.update({name: sum(bool(re.search(p, line)) for line in ops) for name, p in COUNTED.items()})
    return row


def kernels() -> dict:
    """name -> (kernel, signature, constexprs, warps, stages): Llama-3.1-8B shapes, bf16 queries, chunks of 8."""
    shapes = dict(HKV=8, G=4, D=128, BS=16, BG=td._pad_rows(4), PREC="tf32", NX=0)
    out = {}
    for kdt in ("fp8e4nv", "bf16"):
        fp8 = kdt == "fp8e4nv"
        pools = {"q": "*bf16", "k_cache": f"*{kdt}", "k_scales": "*fp32", "k_exact": "*bf16", "k_channels": "*i32",
                 "block_tables": "*i32", "lengths": "*i32"}
        scan = {**pools, "chunk_lse": "*fp32", "m_out": "*fp32", "l_out": "*fp32", "scale": "fp32",
                "max_blocks": "i32", "per_split": "i32", "LC": "i32"}
        per_split = 5504  # a split's tokens at 32k and batch 46 on 132 SMs (triton_decode._split)
        scan_consts = dict(shapes, KEEP=td._kept(4), BLOCK_N=td.SCAN_TILE, C=8, KQ=fp8, F16=fp8,
                           PAGES=td._scan_pages(per_split, 16))
        out[f"scan {kdt}"] = (td._scores_kernel, scan, scan_consts, td.SCAN_WARPS, td.SCAN_STAGES)
        if fp8:  # the engine's FP8 default: 4 exact channels a KV head
            out["scan fp8e4nv, 4 exact"] = (td._scores_kernel, scan, dict(scan_consts, NX=4), td.SCAN_WARPS,
                                            td.SCAN_STAGES)
        full = {**pools, "v_cache": f"*{kdt}", "v_scales": "*fp32", "acc_out": "*fp32", "m_out": "*fp32",
                "l_out": "*fp32", "scale": "fp32", "max_blocks": "i32", "per_split": "i32"}
        full = {n: full[n] for n in td._full_split_kernel.arg_names if n in full}
        tile = td.FULL_TILE[1 if fp8 else 2]
        out[f"full {kdt}"] = (td._full_split_kernel, full, dict(shapes, BLOCK_N=tile, KQ=fp8, VQ=fp8, F16=fp8),
                              td.FULL_WARPS, td.FULL_STAGES)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dump", help="also write each kernel's TTGIR and PTX here")
    parser.add_argument("--table", choices=("regs", "tile"), default="regs" if td.SCAN_TABLE_IN_REGISTERS else "tile",
                        help="the scan's block table in registers (SCAN_TABLE_IN_REGISTERS) or looked up per tile")
    parser.add_argument("--scan-stages", type=int, default=td.SCAN_STAGES, help="the scan's SCAN_STAGES")
    args = parser.parse_args()
    td.SCAN_TABLE_IN_REGISTERS = args.table == "regs"
    td.SCAN_STAGES = args.scan_stages
    for name, (fn, signature, constexprs, warps, stages) in kernels().items():
        kernel = compile_sm90(fn, signature, constexprs, warps, stages)
        print(name, summary(kernel), flush=True)
        if args.dump:
            os.makedirs(args.dump, exist_ok=True)
            stem = os.path.join(args.dump, re.sub(r"\W+", "_", name))
            for ext in ("ttgir", "ptx"):
                with open(f"{stem}.{ext}", "w") as f:
                    f.write(kernel.asm[ext])


if __name__ == "__main__":
    main()

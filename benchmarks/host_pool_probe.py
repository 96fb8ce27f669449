"""Zero-copy gather bandwidth of random 256-byte V rows from a host pool, by pool size and page size.

The GPU translates every host address it reads; with 4 KiB pages a large pool overflows its TLB. This probe
compares an ordinary registered allocation with one backed by 2 MiB huge pages (hugetlbfs), whose pages the
driver can map with large GPU page-table entries. Prints a table; needs root for /proc/sys/vm/nr_hugepages.
"""
from __future__ import annotations

import json
import mmap
import os
import sys

import torch
import triton
import triton.language as tl

MAP_HUGETLB = 0x40000
ROW = 128  # bf16 elements: 256 bytes, one V row of a head_dim-128 model


@triton.jit
def _gather(src, idx, dst, n, D: tl.constexpr, BR: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    d = tl.arange(0, D)
    rows = tl.load(idx + r, mask=r < n, other=0)
    x = tl.load(src + rows[:, None] * D + d[None, :], mask=(r < n)[:, None])
    tl.store(dst + r[:, None].to(tl.int64) * D + d[None, :], x, mask=(r < n)[:, None])


def huge_tensor(nbytes: int) -> torch.Tensor:
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_HUGETLB)
    t = torch.frombuffer(buf, dtype=torch.bfloat16)
    t._keepalive = buf  # noqa: SLF001 - the mapping must outlive the tensor
    return t


def register(t: torch.Tensor) -> None:
    err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
    assert int(err) == 0, err


def bandwidth(src: torch.Tensor, rows: int = 1 << 18, reps: int = 20) -> float:
    n_rows = src.numel() // ROW
    idx = torch.randint(0, n_rows, (rows,), device="cuda", dtype=torch.int64)
    dst = torch.empty(rows, ROW, dtype=src.dtype, device="cuda")
    launch = lambda: _gather[(triton.cdiv(rows, 128),)](src, idx, dst, rows, D=ROW, BR=128, num_warps=4)  # noqa: E731
    launch()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        launch()
    end.record()
    torch.cuda.synchronize()
    return rows * ROW * 2 * reps / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    sizes_gib = [int(x) for x in (sys.argv[1:] or ["1", "4", "16", "48"])]
    results = []
    for kind in ("4k", "2m"):
        for gib in sizes_gib:
            nbytes = gib << 30
            if kind == "2m":
                with open("/proc/sys/vm/nr_hugepages", "w") as f:
                    f.write(str(nbytes // (2 << 20) + 16))
                t = huge_tensor(nbytes)
            else:
                t = torch.empty(nbytes // 2, dtype=torch.bfloat16)
            t.view(torch.int16).fill_(1)  # touch every page
            register(t)
            bw = bandwidth(t)
            results.append({"pages": kind, "pool_gib": gib, "gather_gb_s": round(bw, 1)})
            print(f"{kind:>3} pages  pool {gib:>3} GiB  random 256 B rows  {bw:6.1f} GB/s", flush=True)
            torch.cuda.cudart().cudaHostUnregister(t.data_ptr())
            del t
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "host_pool_probe.json"), "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

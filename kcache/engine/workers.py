"""Ranks 1..N-1 of a tensor-parallel engine, one process each (rank 0 is the engine's own process).

A worker starts its rank as rank 0 does (kcache.engine.rank), then runs every step rank 0 sends down its pipe
until it receives None.
"""
from __future__ import annotations

import torch.multiprocessing as mp

from kcache.config import EngineConfig
from kcache.distributed import comm
from kcache.engine.rank import start_rank


class Workers:
    def __init__(self, cfg: EngineConfig, port: int):
        ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
        self.conns, self.procs = [], []
        for rank in range(1, cfg.tensor_parallel_size):
            recv, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_main, args=(cfg, rank, port, recv), name=f"kcache-tp{rank}", daemon=True)
            proc.start()
            self.conns.append(send)
            self.procs.append(proc)

    def send_stop(self) -> None:
        """Tell every worker to leave its step loop and the process group."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:  # that worker is gone already
                pass

    def join(self, timeout: float = 30.0) -> None:
        for proc in self.procs:
            proc.join(timeout)
            if proc.is_alive():
                proc.terminate()
                proc.join()
        self.conns, self.procs = [], []


def _main(cfg: EngineConfig, rank: int, port: int, conn) -> None:
    runner = start_rank(cfg, rank, port).runner
    while (step := conn.recv()) is not None:
        runner.execute(*step)
    runner.cache.close()
    comm.exit_worker()

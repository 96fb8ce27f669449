"""Decode-time statistics of a cache, shared by the engine, the Hugging Face integration and the evaluation."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass
class DecodeStats:
    """What one decode (or teacher-forced) step measured, per row of the batch, as the cache returns it: still on
    the device, so that the sampler fetches it in its one copy. FullKV, and KCache with every layer exact, return
    None instead."""

    mass_sum: torch.Tensor  # [B] float32: mass kept, summed over the approximated layers and this rank's heads
    mass_min: torch.Tensor  # [B] float32: its minimum over those layers and heads
    v_bytes: torch.Tensor  # [B] float32: V bytes this rank read from host memory (counted by the attention op)
    samples: int  # (layer, head) pairs summed into mass_sum per row

    def select(self, rows: list[int]) -> "DecodeStats":
        """The stats of these rows only."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.mass_sum.device)
        return DecodeStats(self.mass_sum[idx], self.mass_min[idx], self.v_bytes[idx], self.samples)

    def mass_mean(self) -> torch.Tensor:
        """[B] mean mass kept per row."""
        return self.mass_sum / self.samples


@dataclass
class CacheStats:
    """Accumulated over decode steps. Mass kept: softmax weight of the selected tokens, per layer and query head."""

    decode_steps: int = 0
    mass_kept_sum: float = 0.0  # sum over (step, layer, head) samples
    mass_kept_count: int = 0
    mass_kept_min: float = 1.0
    v_bytes_read: int = 0  # V bytes read from host memory by the top-N gather
    device_bytes: int = 0  # bytes the cache holds on the model's device (K, plus V of dense layers / FullKV)
    host_bytes: int = 0  # bytes the cache holds in host memory (V)

    @property
    def mass_kept_mean(self) -> float:
        return self.mass_kept_sum / self.mass_kept_count if self.mass_kept_count else 1.0

    def add_step(self, mass_sum: float, samples: int, mass_min: float, v_bytes: int) -> None:
        """Account one decode step of one sequence (DecodeStats fetched to the host)."""
        self.decode_steps += 1
        self.add_mass(mass_sum, samples, mass_min)
        self.v_bytes_read += v_bytes

    def add_mass(self, total: float, count: int, minimum: float) -> None:
        self.mass_kept_sum += total
        self.mass_kept_count += count
        self.mass_kept_min = min(self.mass_kept_min, minimum)

    def as_dict(self) -> dict:
        return {**asdict(self), "mass_kept_mean": self.mass_kept_mean}

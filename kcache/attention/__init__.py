"""Attention math: the torch reference (any device) and Triton kernels (CUDA), behind one choice."""
from __future__ import annotations

import torch

from kcache.attention import reference


def decode_ops(device: torch.device):
    """The module whose `full_decode` and `kcache_decode` run on this device: Triton on CUDA, else the reference."""
    if device.type == "cuda":
        try:
            from kcache.attention import triton_decode
        except ImportError:  # Triton missing: the reference still runs, only slower
            return reference
        return triton_decode
    return reference

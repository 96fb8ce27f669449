"""Attention math: the torch reference (any device) and Triton kernels (CUDA), behind one choice."""
from __future__ import annotations

import logging

import torch

from kcache.attention import reference

log = logging.getLogger("kcache")


def decode_ops(device: torch.device):
    """The module whose `full_decode` and `kcache_decode` run on this device: Triton on CUDA, else the reference."""
    if device.type == "cuda":
        try:
            from kcache.attention import triton_decode
        except ImportError as e:  # Triton missing: the reference still runs, many times slower
            log.warning("Triton is not importable (%s): decode attention on %s runs the torch reference, which reads "
                        "V through the CPU and is many times slower", e, device)
            return reference
        return triton_decode
    return reference

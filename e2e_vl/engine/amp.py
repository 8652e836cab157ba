"""Autocast on a CPU: measured, so that a bf16 config run on a CPU says at start what it will cost.

A CPU without native bf16 (no AVX512-BF16 / AMX) emulates bf16 matrix products, and the issue measured a
15x slower training step; the paper configs ask for bf16 because they were written for GPUs.
"""
from __future__ import annotations

import time

import torch

# Below this ratio the cost is not worth a warning (timer noise on a busy machine).
SLOWDOWN_WORTH_A_WARNING = 1.5


def measure_autocast_slowdown(dtype: torch.dtype, repeats: int = 5) -> float:
    """Seconds of a small convolution + linear layer's forward and backward on the CPU under `dtype`
    autocast over the same in fp32 (the best of `repeats` each, so a busy core counts less): the two kinds
    of layer the detector and the transformer spend their time in."""
    conv, linear = torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.Linear(256, 256)
    image, tokens = torch.randn(2, 64, 32, 32), torch.randn(1024, 256)

    def best(enabled: bool) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=dtype, enabled=enabled):
                out = conv(image).float().sum() + linear(tokens).float().sum()
            out.backward()
            times.append(time.perf_counter() - start)
        return min(times)

    best(True)  # warm-up: the first call pays for kernel selection
    return best(True) / max(best(False), 1e-9)


def cpu_autocast_warning(dtype_name: str, slowdown: float) -> str | None:
    """The one warning line for SOLVER.AMP.DTYPE `dtype_name` on a CPU measured `slowdown` x slower, or None
    when it costs too little to mention."""
    if slowdown < SLOWDOWN_WORTH_A_WARNING:
        return None
    return (f"SOLVER.AMP.DTYPE {dtype_name} on the CPU: a matrix product ran {slowdown:.1f}x slower under "
            f"{dtype_name} autocast than in fp32 on this machine (no native {dtype_name}); "
            "SOLVER.AMP.DTYPE none trains faster here")

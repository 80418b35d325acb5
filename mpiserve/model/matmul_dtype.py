"""Which dtype the linear layers multiply in.

A bfloat16 or float16 checkpoint keeps its dtype for activations and the KV cache, but on a
CPU without native half-precision matrix units (no AMX or AVX-512-BF16: oneDNN emulates them)
a half-precision matmul runs many times slower than float32. There the weights are widened to
float32 once at load (exact) and each product is rounded back to the serving dtype, which is
what a native half matmul with float32 accumulation returns, up to the order of the sums.
"""

from __future__ import annotations

import time

import torch

from .linear_weight import for_linear, linear

_PROBE_SHAPE = (64, 512, 512)      # rows, inner, outer: a small prefill-like product
_PROBE_REPEATS = 3


def choose_matmul_dtype(dtype: torch.dtype, device: torch.device, setting: str) -> torch.dtype:
    """`setting`: "auto" (measure on CPU; GPUs multiply in `dtype`), or a dtype name."""
    if setting != "auto":
        return getattr(torch, setting)
    if dtype == torch.float32 or device.type != "cpu":
        return dtype
    return dtype if _seconds_per_matmul(dtype) < _seconds_per_matmul(torch.float32) \
        else torch.float32


def _seconds_per_matmul(dtype: torch.dtype) -> float:
    rows, inner, outer = _PROBE_SHAPE
    x = torch.ones(rows, inner, dtype=dtype)
    w = for_linear(torch.ones(outer, inner, dtype=dtype))   # as the model will hold it
    linear(x, w)                                           # first call: kernel selection
    best = float("inf")
    for _ in range(_PROBE_REPEATS):
        start = time.perf_counter()
        linear(x, w)
        best = min(best, time.perf_counter() - start)
    return best

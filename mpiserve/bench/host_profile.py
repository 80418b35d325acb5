"""Where one call's time goes on the host, and how much of it the device was busy.

`profile_call(fn, device)` runs `fn` twice: once under cProfile (the Python functions that
took the time: the engine's own bookkeeping, torch's dispatch, numba's launches) and once
under torch.profiler (the device kernels' total time, against the call's wall time). A step
whose kernels fill a small part of its wall time is bound by the host, not by the device.
"""

from __future__ import annotations

import cProfile
import pstats
import time
from pathlib import Path

import torch

TOP_FUNCTIONS = 25


def profile_call(fn, device: str) -> dict:
    return {**device_share(fn, device), "host_functions": host_functions(fn)}


def host_functions(fn, top: int = TOP_FUNCTIONS) -> list[dict]:
    """The `top` functions by cumulative time of one call of `fn` under cProfile."""
    profiler = cProfile.Profile()
    profiler.runcall(fn)
    stats = pstats.Stats(profiler).stats        # (file, line, name) -> (cc, calls, tt, ct, _)
    ranked = sorted(stats.items(), key=lambda item: item[1][3], reverse=True)
    return [{"function": _where(key), "calls": calls, "own_s": round(own, 6),
             "cumulative_s": round(cumulative, 6)}
            for key, (_, calls, own, cumulative, _) in ranked[:top]]


def device_share(fn, device: str) -> dict:
    """Wall seconds of one call of `fn`, and the seconds its device kernels ran (CUDA only)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        wall = time.perf_counter() - start
    events = prof.key_averages()
    kernels = sum(map(_kernel_us, events)) / 1e6 if device == "cuda" else None
    busiest = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:TOP_FUNCTIONS]
    return {"wall_s": wall, "device_kernels_s": kernels,
            "device_busy_share": None if kernels is None else kernels / wall,
            "ops_by_host_time": [{"op": e.key, "calls": e.count,
                                  "own_host_s": e.self_cpu_time_total / 1e6} for e in busiest]}


def _kernel_us(event) -> float:
    """Microseconds of a device row (a kernel or a copy); 0 for a host row. Host rows carry
    their kernels' time too, so only device rows are summed."""
    on_device = event.device_type == torch.autograd.DeviceType.CUDA
    if not on_device or event.is_user_annotation:
        return 0.0
    return getattr(event, "self_device_time_total", None) or event.self_cuda_time_total


def _where(key: tuple[str, int, str]) -> str:
    file, line, name = key
    if file == "~":                                   # a built-in
        return name
    parts = Path(file).parts
    return f"{'/'.join(parts[-2:])}:{line}({name})"

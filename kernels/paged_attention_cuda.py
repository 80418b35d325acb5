"""Paged decode attention for CUDA tensors, written with numba-cuda.

Same contract as :func:`mpiserve.kernels.paged_attention.paged_decode_attention_reference`:
``q[B, H, D]`` attends to the first ``context_lens[b]`` positions of the pages that
``page_table[b]`` lists in ``kv[2, num_pages, page_size, KVH, D]``; query head ``h`` reads kv
head ``h // (H // KVH)``. One thread block per (sequence, query head) walks the positions in
chunks of ``THREADS``: each thread scores one position, the block reduces the chunk's
maximum and sum in shared memory, and the running output (each thread owns up to
``PER_THREAD`` head dims) is rescaled with an online softmax (flash-decoding style). All sums
are float32; float16 KV is read natively, bfloat16 KV as int16 bit patterns widened in
registers. Page ids are not checked on the device (a check would need a host sync).

This module imports ``numba.cuda``; :mod:`mpiserve.kernels.paged_attention` imports it only
for CUDA tensors (or tests import it under ``NUMBA_ENABLE_CUDASIM=1``), so CPU-only installs
never load it.
"""

import functools
import math

import numpy as np
import torch
from numba import config as numba_config
from numba import cuda, float32, int32
from numba.cuda import libdevice

THREADS = 64  # threads per block; a power of two (tree reductions)
PER_THREAD = 4  # head dims each thread accumulates: head_dim <= THREADS * PER_THREAD
_NEG_INF = float32(-math.inf)


def unavailable_reason(q, kv):
    """Why the kernel cannot run on these tensors, or None when it can."""
    reason = _toolchain_missing()
    if reason is not None:
        return reason
    if q.dtype != kv.dtype or kv.dtype not in _WIDEN_OF:
        return (f"q {q.dtype} / kv {kv.dtype}: the kernel takes matching float32, "
                "float16 or bfloat16")
    if q.shape[2] > THREADS * PER_THREAD:
        return f"head_dim {q.shape[2]} exceeds {THREADS * PER_THREAD}"
    return None


@functools.cache
def _toolchain_missing():
    """Why numba-cuda cannot compile and launch here, or None (probed once per process:
    the model calls the dispatch for every layer of every step)."""
    if not cuda.is_available():
        return "numba-cuda finds no usable CUDA driver/device"
    from numba.cuda.cudadrv import nvvm
    if not nvvm.is_available():
        return "numba-cuda finds no NVVM to compile with (pip install 'numba-cuda[cu12]')"
    return None


def paged_decode_attention_cuda(q, kv, page_table, context_lens, scale):
    """Paged decode attention on the GPU (or on CPU tensors under the numba CUDA simulator).

    Launches on torch's current stream; returns ``[B, H, D]`` in ``q``'s dtype.
    """
    batch, heads, dim = q.shape
    if heads % kv.shape[3] != 0:
        raise ValueError(f"{heads} query heads are not a multiple of {kv.shape[3]} kv heads")
    if dim > THREADS * PER_THREAD:
        raise ValueError(f"head_dim {dim} exceeds the kernel's {THREADS * PER_THREAD}")
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    args = (q.float().contiguous(), kv.contiguous().view(_STORED_AS.get(kv.dtype, kv.dtype)),
            page_table.to(q.device, torch.int32).contiguous(),
            context_lens.to(q.device, torch.int32).contiguous())
    kernel = _kernel(kv.dtype)
    arrays = [_device_array(t) for t in (*args, out)]
    launch = kernel[(batch, heads), THREADS, _stream(q)]
    launch(*arrays[:4], float32(scale), arrays[4])
    return out.to(q.dtype)


def _device_array(tensor):
    """A numba view of a tensor: zero-copy for CUDA tensors; a numpy view under the simulator.

    No stream sync on import (``sync=False``): the kernel runs on torch's current stream,
    after the work that produced the tensors, so a host wait per layer would only stall."""
    if tensor.is_cuda:
        return cuda.as_cuda_array(tensor, sync=False)
    return tensor.numpy()


def _stream(tensor):
    if tensor.is_cuda:
        return cuda.external_stream(torch.cuda.current_stream(tensor.device).cuda_stream)
    return 0


def _widen_bfloat16_sim(bits):
    """float32 of a bfloat16 given as int16 bits (simulator: numpy reinterpretation)."""
    return np.uint32((int(bits) & 0xFFFF) << 16).view(np.float32)


def _widen_bfloat16_device(bits):
    """float32 of a bfloat16 given as int16 bits: the pattern moved to the top half.
    (Compiled by numba-cuda: ``libdevice`` must be a global; an import statement here
    would not compile.)"""
    return libdevice.int_as_float(int32((int32(bits) & 0xFFFF) << 16))


def _widen_float(value):
    return float32(value)


def _bfloat16_widener():
    return _widen_bfloat16_sim if numba_config.ENABLE_CUDASIM else _widen_bfloat16_device


_STORED_AS = {torch.bfloat16: torch.int16}
_WIDEN_OF = {torch.float32: _widen_float, torch.float16: _widen_float, torch.bfloat16: None}


@cuda.jit(device=True)
def _block_reduce(value, buf, tid, take_max):
    """Maximum (``take_max``) or sum of ``value`` over the block; every thread gets it."""
    buf[tid] = value
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            other = buf[tid + step]
            buf[tid] = max(buf[tid], other) if take_max else buf[tid] + other
        cuda.syncthreads()
        step //= 2
    result = buf[0]
    cuda.syncthreads()
    return result


@functools.cache
def _kernel(dtype):
    """The decode kernel compiled for KV of ``dtype`` (its widening to float32 inlined)."""
    widen = cuda.jit(device=True)(_WIDEN_OF[dtype] or _bfloat16_widener())

    @cuda.jit
    def decode(q, kv, page_table, context_lens, scale, out):
        b, h, tid = cuda.blockIdx.x, cuda.blockIdx.y, cuda.threadIdx.x
        dim, page_size = q.shape[2], kv.shape[2]
        k = h // (q.shape[1] // kv.shape[3])
        length = context_lens[b]
        weights = cuda.shared.array(THREADS, float32)
        buf = cuda.shared.array(THREADS, float32)
        acc = cuda.local.array(PER_THREAD, float32)
        for i in range(PER_THREAD):
            acc[i] = float32(0.0)
        peak, total = _NEG_INF, float32(0.0)
        for start in range(0, length, THREADS):
            t = start + tid
            score = _NEG_INF
            if t < length:
                page, slot = page_table[b, t // page_size], t % page_size
                dot = float32(0.0)
                for d in range(dim):
                    dot += q[b, h, d] * widen(kv[0, page, slot, k, d])
                score = dot * scale
            new_peak = max(peak, _block_reduce(score, buf, tid, True))
            weight = float32(math.exp(score - new_peak)) if t < length else float32(0.0)
            weights[tid] = weight
            rescale = float32(math.exp(peak - new_peak))
            total = total * rescale + _block_reduce(weight, buf, tid, False)
            for i in range(PER_THREAD):
                d = tid + i * THREADS
                if d < dim:
                    value = acc[i] * rescale
                    for j in range(min(THREADS, length - start)):
                        p = start + j
                        row = page_table[b, p // page_size]
                        value += weights[j] * widen(kv[1, row, p % page_size, k, d])
                    acc[i] = value
            peak = new_peak
            cuda.syncthreads()
        for i in range(PER_THREAD):
            d = tid + i * THREADS
            if d < dim:
                out[b, h, d] = acc[i] / total

    return decode

"""Decode attention over a paged KV cache: a torch reference and a numba CPU kernel.

One query token per sequence attends to every cached position of that sequence. The cache
of one layer is ``kv[2, num_pages, page_size, num_kv_heads, head_dim]`` (0 = K, 1 = V) and
``page_table[b]`` lists the pages of sequence ``b`` in order. Query head ``h`` reads kv
head ``h // (H // KVH)`` (grouped-query attention). Both paths compute in float32 with a
max-subtracted softmax; they agree to a few float32 roundings (the numba kernel sums dot
products and exponentials in SIMD lanes, so not in the reference's order).
"""

import functools
import warnings

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_SUM_BLOCK = 64  # positions summed apart before joining a running sum (bounds rounding)
_PREFETCH_AHEAD = 2048  # K/V elements (8 KiB of float32) requested ahead of their use
_LINE = 16  # float32 elements per 64-byte cache line
# Lets LLVM reorder the sums of dot products and of exponentials into SIMD lanes and fuse
# multiply-adds; no other fast-math licence (NaN and inf keep IEEE semantics).
_SIMD = {"reassoc", "contract"}

# expf by Cody-Waite range reduction and the Cephes polynomial (within 1 ulp of exp for
# arguments in [_EXP_FLOOR, 0]); written out so that it vectorises, which libm's does not.
_LOG2E = np.float32(1.44269504088896341)
_LN2_HI = np.float32(0.693359375)  # ln 2 in 9 significant bits: n * _LN2_HI is exact
_LN2_LO = np.float32(-2.12194440e-4)  # ln 2 - _LN2_HI
_EXP_POLY = (np.float32(1.9875691500e-4), np.float32(1.3981999507e-3),
             np.float32(8.3334519073e-3), np.float32(4.1665795894e-2),
             np.float32(1.6666665459e-1), np.float32(5.0000001201e-1))
_EXP_FLOOR = np.float32(-87.33654)  # ln(FLT_MIN); exp of anything below is taken as 0


def paged_decode_attention_reference(q, kv, page_table, context_lens, scale):
    """Attention of ``q[B, H, D]`` over the first ``context_lens[b]`` cached positions.

    Gathers each sequence's pages into a padded ``[B, T, KVH, D]`` block, masks the
    positions past ``context_lens[b]``, and returns ``[B, H, D]`` in ``q``'s dtype.
    Page-table entries past a sequence's last page are never read as page ids.
    """
    batch, heads, dim = q.shape
    page_size, kv_heads = kv.shape[2], kv.shape[3]
    lens = context_lens.to(device=q.device, dtype=torch.long)
    pages_per_seq = (lens + page_size - 1) // page_size
    width = int(pages_per_seq.max().item())
    cols = torch.arange(width, device=q.device)
    table = page_table[:, :width].to(device=q.device, dtype=torch.long)
    pages = torch.where(cols < pages_per_seq[:, None], table, 0)
    keys = kv[0][pages].reshape(batch, width * page_size, kv_heads, dim).float()
    values = kv[1][pages].reshape(batch, width * page_size, kv_heads, dim).float()
    queries = q.float().reshape(batch, kv_heads, heads // kv_heads, dim)
    scores = torch.einsum("bkgd,btkd->bkgt", queries, keys) * scale
    positions = torch.arange(width * page_size, device=q.device)
    padding = (positions[None, :] >= lens[:, None])[:, None, None, :]
    probs = scores.masked_fill(padding, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bkgt,btkd->bkgd", probs, values)
    return out.reshape(batch, heads, dim).to(q.dtype)


@intrinsic
def _prefetch(typingctx, array, offset):
    """Ask the CPU to fetch the cache line holding element ``offset`` of a contiguous
    ``array`` (``llvm.prefetch``: read, keep in all cache levels)."""
    sig = types.void(array, types.intp)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        byte_ptr, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, i32, i32, i32])
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
        address = builder.bitcast(builder.gep(data, [args[1]]), byte_ptr)
        builder.call(fn, [address] + [ir.Constant(i32, flag) for flag in (0, 3, 1)])
        return context.get_dummy_value()

    return sig, codegen


def _float_row(row, scratch):
    """``row`` as float32: itself when it is float32; a half-precision row held as 16-bit
    patterns (bfloat16 as int16, float16 as uint16) widened into ``scratch``, exactly."""


@overload(_float_row, inline="always")
def _float_row_impl(row, scratch):
    if row.dtype == types.float32:
        return lambda row, scratch: row
    widen_one = _bfloat16_bits if row.dtype == types.int16 else _float16_bits

    def widen(row, scratch):
        for i in range(row.shape[0]):
            scratch[i] = widen_one(np.uint32(row[i]) & np.uint32(0xFFFF))
        return scratch.view(np.float32)
    return widen


@numba.njit(cache=True, inline="always")
def _bfloat16_bits(h):
    """float32 bit pattern of the bfloat16 with bits ``h``: its top half."""
    return h << np.uint32(16)


@numba.njit(cache=True, inline="always")
def _float16_bits(h):
    """float32 bit pattern of the IEEE half with bits ``h`` (normals, subnormals, zeros,
    infinities and NaNs)."""
    sign = (h & np.uint32(0x8000)) << np.uint32(16)
    exponent = (h >> np.uint32(10)) & np.uint32(0x1F)
    mantissa = h & np.uint32(0x3FF)
    if exponent == 0x1F:                                   # inf / NaN
        return sign | np.uint32(0x7F800000) | (mantissa << np.uint32(13))
    if exponent != 0:                                      # normal: rebias 15 -> 127
        return sign | ((exponent + np.uint32(112)) << np.uint32(23)) | (mantissa << np.uint32(13))
    if mantissa == 0:
        return sign
    shift = np.uint32(0)                                   # subnormal: normalise the mantissa
    while mantissa & np.uint32(0x400) == 0:
        mantissa <<= np.uint32(1)
        shift += np.uint32(1)
    return (sign | ((np.uint32(113) - shift) << np.uint32(23))
            | ((mantissa & np.uint32(0x3FF)) << np.uint32(13)))


@numba.njit(cache=True, fastmath=False)
def _check_pages(pages, length, page_size, num_pages):
    """Raise unless the first ``ceil(length / page_size)`` page ids are valid."""
    used = (length + page_size - 1) // page_size
    if length < 1 or used > pages.shape[0]:
        raise IndexError("context length is < 1 or exceeds the page table")
    for i in range(used):
        if pages[i] < 0 or pages[i] >= num_pages:
            raise IndexError("page id out of range")


@numba.njit(cache=True, fastmath=False)
def _pages_ahead(rows):
    """How many pages ahead of the one being read to prefetch: enough for
    ``_PREFETCH_AHEAD`` elements, at least one."""
    page = rows.shape[1] * rows.shape[2] * rows.shape[3]
    return max(1, (_PREFETCH_AHEAD + page - 1) // page)


@numba.njit(cache=True, fastmath=False, inline="always")
def _prefetch_row(row):
    """Prefetch every cache line of one contiguous ``[KVH, D]`` cache row."""
    for i in range(0, row.size, _LINE):
        _prefetch(row, i)


@numba.njit(cache=True, fastmath=_SIMD)
def _attention_scores(queries, keys, pages, length, scale, scores, peaks):
    """``scores[h, t] = scale * (queries[h] . key(t, h // group))`` and ``peaks[h]`` the
    row maxima.

    Walks the positions in order and reads each position's key row (all kv heads) once,
    serving every query head of each kv head from it; the row of the same slot
    ``_pages_ahead`` pages on is prefetched meanwhile.
    """
    kv_heads, page_size = keys.shape[2], keys.shape[1]
    group = queries.shape[0] // kv_heads
    used = (length + page_size - 1) // page_size
    ahead = _pages_ahead(keys)
    scratch = np.empty(keys.shape[3], dtype=np.uint32)
    peaks[:] = -np.inf
    for p in range(used):
        page = keys[pages[p]]
        for s in range(min(page_size, length - p * page_size)):
            if p + ahead < used:
                _prefetch_row(keys[pages[p + ahead], s])
            t = p * page_size + s
            for k in range(kv_heads):
                key = _float_row(page[s, k], scratch)
                for h in range(k * group, (k + 1) * group):
                    score = _dot(queries[h], key) * scale
                    scores[h, t] = score
                    peaks[h] = max(peaks[h], score)


@numba.njit(cache=True, fastmath=_SIMD, inline="always")
def _dot(a, b):
    total = np.float32(0.0)
    for d in range(a.shape[0]):
        total += a[d] * b[d]
    return total


@numba.njit(cache=True, fastmath={"contract"})
def _exp_parts(row, peak, exponent):
    """``exp(row - peak)`` split in two: ``row`` becomes ``e^r`` with ``|r| <= ln2 / 2``
    and ``exponent`` the float32 bit pattern of ``2^n``, ``n = round((row - peak) / ln2)``.
    Arguments below ``_EXP_FLOOR`` give 0; NaN stays NaN."""
    for t in range(row.shape[0]):
        x = row[t] - peak
        clamped = _EXP_FLOOR if x < _EXP_FLOOR else x
        n = np.floor(clamped * _LOG2E + np.float32(0.5))
        r = clamped - n * _LN2_HI - n * _LN2_LO
        poly = _EXP_POLY[0]
        for c in _EXP_POLY[1:]:
            poly = poly * r + c
        row[t] = np.float32(0.0) if x < _EXP_FLOOR else poly * (r * r) + r + np.float32(1.0)
        exponent[t] = (np.int32(n) + np.int32(127)) << 23


@numba.njit(cache=True, fastmath=_SIMD)
def _softmax_numerators(scores, peaks, exponent, totals):
    """``scores[h] = exp(scores[h] - peaks[h])`` in place and ``totals[h]`` their sum,
    summed ``_SUM_BLOCK`` positions at a time. ``exponent`` is int32 scratch of a row's
    length."""
    length = scores.shape[1]
    powers = exponent.view(np.float32)
    for h in range(scores.shape[0]):
        row = scores[h]
        _exp_parts(row, peaks[h], exponent)
        total = np.float32(0.0)
        for start in range(0, length, _SUM_BLOCK):
            part = np.float32(0.0)
            for t in range(start, min(start + _SUM_BLOCK, length)):
                row[t] *= powers[t]
                part += row[t]
            total += part
        totals[h] = total


@numba.njit(cache=True, fastmath=_SIMD)
def _weighted_values(weights, values, pages, length, part, out):
    """``out[h] = sum_t weights[h, t] * value(t, h // group)``.

    Same walk as :func:`_attention_scores` over the value rows; each block of
    ``_SUM_BLOCK`` positions is summed into ``part`` before joining ``out``.
    """
    kv_heads, page_size = values.shape[2], values.shape[1]
    group = weights.shape[0] // kv_heads
    used = (length + page_size - 1) // page_size
    ahead = _pages_ahead(values)
    scratch = np.empty(values.shape[3], dtype=np.uint32)
    out[:] = 0.0
    part[:] = 0.0
    for p in range(used):
        page = values[pages[p]]
        for s in range(min(page_size, length - p * page_size)):
            if p + ahead < used:
                _prefetch_row(values[pages[p + ahead], s])
            t = p * page_size + s
            for k in range(kv_heads):
                value = _float_row(page[s, k], scratch)
                for h in range(k * group, (k + 1) * group):
                    _axpy(weights[h, t], value, part[h])
            if (t + 1) % _SUM_BLOCK == 0 or t + 1 == length:
                for h in range(out.shape[0]):
                    for d in range(out.shape[1]):
                        out[h, d] += part[h, d]
                        part[h, d] = 0.0


@numba.njit(cache=True, fastmath=_SIMD, inline="always")
def _axpy(weight, x, acc):
    for d in range(acc.shape[0]):
        acc[d] += weight * x[d]


@numba.njit(cache=True, fastmath=False)
def _decode_kernel(q, kv, page_table, context_lens, scale, out):
    """Fill ``out[B, H, D]`` with paged decode attention, reading K/V in place.

    Per sequence: scores from the key rows, softmax numerators and their sums, the
    weighted sum of the value rows, then one division per output element. Each sequence
    is computed on its own, so its result does not depend on the rest of the batch.
    """
    heads, dim = q.shape[1], q.shape[2]
    longest = 1
    for b in range(q.shape[0]):
        longest = max(longest, context_lens[b])
    scores_buf = np.empty(heads * longest, dtype=np.float32)
    exponent_buf = np.empty(longest, dtype=np.int32)
    peaks = np.empty(heads, dtype=np.float32)
    totals = np.empty(heads, dtype=np.float32)
    part = np.empty((heads, dim), dtype=np.float32)
    for b in range(q.shape[0]):
        length = context_lens[b]
        pages = page_table[b]
        _check_pages(pages, length, kv.shape[2], kv.shape[1])
        scores = scores_buf[:heads * length].reshape((heads, np.intp(length)))
        _attention_scores(q[b], kv[0], pages, length, scale, scores, peaks)
        _softmax_numerators(scores, peaks, exponent_buf[:length], totals)
        _weighted_values(scores, kv[1], pages, length, part, out[b])
        for h in range(heads):
            for d in range(dim):
                out[b, h, d] /= totals[h]


def paged_decode_attention_numba(q, kv, page_table, context_lens, scale):
    """Numba version of :func:`paged_decode_attention_reference` for CPU float32, bfloat16
    and float16 KV (widened row by row as it is read; the query and all sums are float32).

    Reads K/V straight from the pages (no gathered copy). Other dtypes and CUDA tensors go
    to the torch reference.
    """
    if not _numba_eligible(q, kv):
        return paged_decode_attention_reference(q, kv, page_table, context_lens, scale)
    out = torch.empty(q.shape, dtype=torch.float32)
    pages = kv.view(_BITS_OF.get(kv.dtype, kv.dtype))
    _decode_kernel(
        _as_numpy(q.float()),
        _as_numpy(pages),
        _as_numpy(page_table.to(torch.int32)),
        _as_numpy(context_lens.to(torch.int32)),
        np.float32(scale),
        out.numpy(),
    )
    return out.to(q.dtype)


def paged_decode_attention(q, kv, page_table, context_lens, scale):
    """Paged decode attention; the entry point the model calls.

    CPU float32, bfloat16 and float16 run the numba kernel, which beat the torch reference at
    every measured batch size and context length (``results/kernels.md``); CUDA tensors run
    the numba-cuda kernel of :mod:`.paged_attention_cuda`.
    """
    if _numba_eligible(q, kv):
        return paged_decode_attention_numba(q, kv, page_table, context_lens, scale)
    if q.is_cuda:
        return _cuda_or_reference(q, kv, page_table, context_lens, scale)
    return paged_decode_attention_reference(q, kv, page_table, context_lens, scale)


def _cuda_or_reference(q, kv, page_table, context_lens, scale):
    """CUDA tensors: the numba-cuda kernel (imported only here, so CPU-only installs never
    load numba.cuda); the torch reference, with a one-time warning naming why, when
    numba-cuda is missing or cannot run these tensors."""
    try:
        from . import paged_attention_cuda as gpu
    except ImportError as error:
        reason = f"numba-cuda is not importable ({error}); install mpiserve[gpu]"
    else:
        reason = gpu.unavailable_reason(q, kv)
        if reason is None:
            return gpu.paged_decode_attention_cuda(q, kv, page_table, context_lens, scale)
    _warn_fallback(reason)
    return paged_decode_attention_reference(q, kv, page_table, context_lens, scale)


@functools.cache
def _warn_fallback(reason):
    warnings.warn(f"CUDA decode attention falls back to the torch reference: {reason}",
                  RuntimeWarning, stacklevel=3)


# how the kernel receives half-precision KV: as 16-bit patterns whose integer type names the
# format (numba has no bfloat16 or float16 on CPU)
_BITS_OF = {torch.bfloat16: torch.int16, torch.float16: torch.uint16}


def _numba_eligible(q, kv):
    return (q.device.type == kv.device.type == "cpu" and q.dtype == kv.dtype
            and kv.dtype in (torch.float32, torch.bfloat16, torch.float16))


def _as_numpy(tensor):
    """A numpy view of a CPU tensor; copies only if it is not contiguous."""
    return tensor.detach().contiguous().numpy()

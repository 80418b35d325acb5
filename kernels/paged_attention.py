"""Decode attention over a paged KV cache: a torch reference and a numba CPU kernel.

One query token per sequence attends to every cached position of that sequence. The cache
of one layer is ``kv[2, num_pages, page_size, num_kv_heads, head_dim]`` (0 = K, 1 = V) and
``page_table[b]`` lists the pages of sequence ``b`` in order. Query head ``h`` reads kv
head ``h // (H // KVH)`` (grouped-query attention). Both paths compute in float32 with a
max-subtracted softmax; they agree to a few float32 roundings (the numba kernel sums dot
products and exponentials in SIMD lanes, so not in the reference's order). The numba kernel
reads K/V a block of up to 16 rows at a time through the vector code of
:mod:`.attention_blocks`, so it takes head dims that are a multiple of 16 (every Llama, Qwen
and Mistral size); other head dims run the reference.
"""

import functools
import warnings

import numba
import numpy as np
import torch

from .attention_blocks import LANES, block_scores, block_shape, block_values, heads_per_call
from .softmax_lanes import exp_shifted
from .vector_code import BITS_OF

_SUM_BLOCK = 64  # positions summed apart before joining a running sum (bounds rounding)
_PREFETCH_AHEAD = 2048  # K/V elements (8 KiB of float32) requested ahead of their use
# Lets LLVM reorder the weighted value sums into SIMD lanes and fuse multiply-adds (the dot
# products and exponentials are vector code already); no other fast-math licence (NaN and
# inf keep IEEE semantics).
_SIMD = {"reassoc", "contract"}


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


@numba.njit(cache=True, fastmath=False)
def _attention_scores(queries, keys, pages, length, scale, scores, peaks, shape):
    """``scores[h, t] = scale * (queries[h] . key(t, h // group))`` and ``peaks[h]`` the
    row maxima.

    Walks the positions in order, a block of up to 16 rows of one page at a time, serving
    every query head of each kv head from it (``len(shape)`` heads a call, see
    ``attention_blocks.block_shape``); each row read asks for the same row of the page
    ``_pages_ahead`` pages on.
    """
    kv_heads, page_size = keys.shape[2], keys.shape[1]
    group = queries.shape[0] // kv_heads
    used = (length + page_size - 1) // page_size
    ahead = _pages_ahead(keys)
    peaks[:] = -np.inf
    for p in range(used):
        page = keys[pages[p]]
        in_page = min(page_size, length - p * page_size)
        later = keys[pages[p + ahead]] if p + ahead < used else page
        for s in range(0, in_page, LANES):
            rows = min(LANES, in_page - s)
            for k in range(kv_heads):
                for first in range(k * group, (k + 1) * group, len(shape)):
                    block_scores(queries, first, page, later, s, k, rows, scale, scores,
                                 p * page_size + s, peaks, shape)


@numba.njit(cache=True, fastmath=False)
def _softmax_numerators(scores, peaks, totals):
    """``scores[h] = exp(scores[h] - peaks[h])`` in place and ``totals[h]`` their sum
    (:mod:`.softmax_lanes`)."""
    for h in range(scores.shape[0]):
        totals[h] = exp_shifted(scores[h], scores.shape[1], peaks[h])


@numba.njit(cache=True, fastmath=_SIMD)
def _weighted_values(weights, values, pages, length, part, out, shape):
    """``out[h] = sum_t weights[h, t] * value(t, h // group)``.

    Same walk as :func:`_attention_scores` over the value rows; the blocks of about
    ``_SUM_BLOCK`` positions are summed into ``part`` before joining ``out``.
    """
    kv_heads, page_size = values.shape[2], values.shape[1]
    group = weights.shape[0] // kv_heads
    used = (length + page_size - 1) // page_size
    ahead = _pages_ahead(values)
    out[:] = 0.0
    part[:] = 0.0
    pending = 0
    for p in range(used):
        page = values[pages[p]]
        in_page = min(page_size, length - p * page_size)
        later = values[pages[p + ahead]] if p + ahead < used else page
        for s in range(0, in_page, LANES):
            rows = min(LANES, in_page - s)
            for k in range(kv_heads):
                for first in range(k * group, (k + 1) * group, len(shape)):
                    block_values(weights, first, p * page_size + s, page, later, s, k, rows,
                                 part, shape)
            pending += rows
            if pending >= _SUM_BLOCK or p * page_size + s + rows == length:
                for h in range(out.shape[0]):
                    for d in range(out.shape[1]):
                        out[h, d] += part[h, d]
                        part[h, d] = 0.0
                pending = 0


@numba.njit(cache=True, fastmath=False)
def _decode_kernel(q, kv, page_table, context_lens, scale, out, shape):
    """Fill ``out[B, H, D]`` with paged decode attention, reading K/V in place.

    Per sequence: scores from the key rows, softmax numerators and their sums, the
    weighted sum of the value rows, then one division per output element. Each sequence
    is computed on its own, so its result does not depend on the rest of the batch.
    ``shape`` (``attention_blocks.block_shape``) carries the head dim and the query heads
    one vector call serves, so that each model compiles its own unrolled code.
    """
    heads, dim = q.shape[1], q.shape[2]
    longest = 1
    for b in range(q.shape[0]):
        longest = max(longest, context_lens[b])
    scores_buf = np.empty(heads * longest, dtype=np.float32)
    peaks = np.empty(heads, dtype=np.float32)
    totals = np.empty(heads, dtype=np.float32)
    part = np.empty((heads, dim), dtype=np.float32)
    for b in range(q.shape[0]):
        length = context_lens[b]
        pages = page_table[b]
        _check_pages(pages, length, kv.shape[2], kv.shape[1])
        scores = scores_buf[:heads * length].reshape((heads, np.intp(length)))
        _attention_scores(q[b], kv[0], pages, length, scale, scores, peaks, shape)
        _softmax_numerators(scores, peaks, totals)
        _weighted_values(scores, kv[1], pages, length, part, out[b], shape)
        for h in range(heads):
            for d in range(dim):
                out[b, h, d] /= totals[h]


def paged_decode_attention_numba(q, kv, page_table, context_lens, scale):
    """Numba version of :func:`paged_decode_attention_reference` for CPU float32, bfloat16
    and float16 KV (widened as it is read; the query and all sums are float32) with a head
    dim that is a multiple of 16.

    Reads K/V straight from the pages (no gathered copy). Other dtypes, head dims and CUDA
    tensors go to the torch reference.
    """
    if not _numba_eligible(q, kv):
        return paged_decode_attention_reference(q, kv, page_table, context_lens, scale)
    out = torch.empty(q.shape, dtype=torch.float32)
    pages = kv.view(BITS_OF[kv.dtype])
    _decode_kernel(
        _as_numpy(q.float()),
        _as_numpy(pages),
        _as_numpy(page_table.to(torch.int32)),
        _as_numpy(context_lens.to(torch.int32)),
        np.float32(scale),
        out.numpy(),
        block_shape(q.shape[-1], heads_per_call(q.shape[1] // kv.shape[3],
                                                kv.dtype != torch.float32)),
    )
    return out.to(q.dtype)


def paged_decode_attention(q, kv, page_table, context_lens, scale):
    """Paged decode attention; the entry point the model calls.

    CPU float32, bfloat16 and float16 with head dims that are multiples of 16 run the numba
    kernel, which beat the torch reference at every measured batch size and context length
    (``results/kernels.md``); CUDA tensors run
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


def _numba_eligible(q, kv):
    return (q.device.type == kv.device.type == "cpu" and q.dtype == kv.dtype
            and kv.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and kv.shape[-1] % LANES == 0)


def _as_numpy(tensor):
    """A numpy view of a CPU tensor; copies only if it is not contiguous."""
    return tensor.detach().contiguous().numpy()

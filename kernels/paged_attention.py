"""Decode attention over a paged KV cache: a torch reference and a numba CPU kernel.

One query token per sequence attends to every cached position of that sequence. The cache
of one layer is ``kv[2, num_pages, page_size, num_kv_heads, head_dim]`` (0 = K, 1 = V) and
``page_table[b]`` lists the pages of sequence ``b`` in order. Query head ``h`` reads kv
head ``h // (H // KVH)`` (grouped-query attention). Both paths compute in float32 with a
max-subtracted softmax, so they agree with each other to float32 rounding.
"""

import numba
import numpy as np
import torch

_KEY_BLOCK = 32  # positions whose keys are transposed together in the numba kernel
_SUM_BLOCK = 64  # positions summed apart before joining a running sum (bounds rounding)


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
def _attention_scores(queries, keys, pages, length, scale, scores):
    """``scores[h, t] = scale * (queries[h] . key(t, h // group))`` for every position.

    Keys are copied ``_KEY_BLOCK`` positions at a time into a transposed
    ``[KVH, D, block]`` scratch, so each dot product still sums over ``d`` in order while
    the positions of a block run side by side in SIMD lanes.
    """
    kv_heads, dim = keys.shape[2], keys.shape[3]
    group = queries.shape[0] // kv_heads
    scratch = np.empty((kv_heads, dim, _KEY_BLOCK), dtype=np.float32)
    for start in range(0, length, _KEY_BLOCK):
        keys_t = scratch[:, :, :min(_KEY_BLOCK, length - start)]
        _transpose_keys(keys, pages, start, keys_t)
        for h in range(queries.shape[0]):
            out = scores[h, start:start + keys_t.shape[2]]
            _block_scores(queries[h], keys_t[h // group], scale, out)


@numba.njit(cache=True, fastmath=False, inline="always")
def _transpose_keys(keys, pages, start, keys_t):
    """``keys_t[:, :, i]`` = keys of position ``start + i``, read through the page table."""
    page_size = keys.shape[1]
    for i in range(keys_t.shape[2]):
        position = start + i
        key = keys[pages[position // page_size], position % page_size]
        for k in range(key.shape[0]):
            for d in range(key.shape[1]):
                keys_t[k, d, i] = key[k, d]


@numba.njit(cache=True, fastmath=False, inline="always")
def _block_scores(query, keys_t, scale, out):
    """``out[i] = scale * sum_d query[d] * keys_t[d, i]``, summed in order of ``d``."""
    out[:] = 0.0
    for d in range(keys_t.shape[0]):
        weight = query[d]
        column = keys_t[d]
        for i in range(out.shape[0]):
            out[i] += weight * column[i]
    for i in range(out.shape[0]):
        out[i] *= scale


@numba.njit(cache=True, fastmath=False)
def _softmax_rows(scores):
    """Max-subtracted softmax of each row of ``scores``, in place."""
    for h in range(scores.shape[0]):
        row = scores[h]
        peak = row.max()
        total = np.float32(0.0)
        for start in range(0, row.shape[0], _SUM_BLOCK):
            part = np.float32(0.0)
            for t in range(start, min(start + _SUM_BLOCK, row.shape[0])):
                row[t] = np.exp(row[t] - peak)
                part += row[t]
            total += part
        for t in range(row.shape[0]):
            row[t] /= total


@numba.njit(cache=True, fastmath=False)
def _weighted_values(probs, values, pages, out):
    """``out[h] = sum_t probs[h, t] * value(t, h // group)``, in blocks of positions."""
    out[:] = 0.0
    part = np.empty_like(out)
    for start in range(0, probs.shape[1], _SUM_BLOCK):
        part[:] = 0.0
        _add_weighted_values(probs, values, pages, start, part)
        for h in range(out.shape[0]):
            for d in range(out.shape[1]):
                out[h, d] += part[h, d]


@numba.njit(cache=True, fastmath=False, inline="always")
def _add_weighted_values(probs, values, pages, start, out):
    """``out[h] += probs[h, t] * value(t, h // group)`` for one block of positions."""
    page_size = values.shape[1]
    group = probs.shape[0] // values.shape[2]
    for t in range(start, min(start + _SUM_BLOCK, probs.shape[1])):
        value = values[pages[t // page_size], t % page_size]
        for h in range(probs.shape[0]):
            weight = probs[h, t]
            head_value = value[h // group]
            row = out[h]
            for d in range(row.shape[0]):
                row[d] += weight * head_value[d]


@numba.njit(cache=True, fastmath=False)
def _decode_kernel(q, kv, page_table, context_lens, scale, out):
    """Fill ``out[B, H, D]`` with paged decode attention, reading K/V in place.

    Each position's K and V rows (all kv heads) are read once, in position order.
    """
    for b in range(q.shape[0]):
        length = context_lens[b]
        pages = page_table[b]
        _check_pages(pages, length, kv.shape[2], kv.shape[1])
        scores = np.empty((q.shape[1], length), dtype=np.float32)
        _attention_scores(q[b], kv[0], pages, length, scale, scores)
        _softmax_rows(scores)
        _weighted_values(scores, kv[1], pages, out[b])


def paged_decode_attention_numba(q, kv, page_table, context_lens, scale):
    """Numba version of :func:`paged_decode_attention_reference` for CPU float32.

    Reads K/V straight from the pages (no gathered copy). Other dtypes and CUDA tensors go
    to the torch reference.
    """
    if not _numba_eligible(q, kv):
        return paged_decode_attention_reference(q, kv, page_table, context_lens, scale)
    out = torch.empty(q.shape, dtype=torch.float32)
    _decode_kernel(
        _as_numpy(q),
        _as_numpy(kv),
        _as_numpy(page_table.to(torch.int32)),
        _as_numpy(context_lens.to(torch.int32)),
        np.float32(scale),
        out.numpy(),
    )
    return out


def paged_decode_attention(q, kv, page_table, context_lens, scale):
    """Paged decode attention; the entry point the model calls.

    CPU float32 runs the numba kernel, which beat the torch reference at every measured
    batch size and context length, by 1.1x to 7x (``results/kernels.md``); everything
    else (bf16/fp16, which numba cannot hold, and CUDA) runs the torch reference.
    """
    if _numba_eligible(q, kv):
        return paged_decode_attention_numba(q, kv, page_table, context_lens, scale)
    return paged_decode_attention_reference(q, kv, page_table, context_lens, scale)


def _numba_eligible(q, kv):
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in (q, kv))


def _as_numpy(tensor):
    """A numpy view of a CPU tensor; copies only if it is not contiguous."""
    return tensor.detach().contiguous().numpy()

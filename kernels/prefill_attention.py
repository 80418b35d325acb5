"""Causal attention of a prefill chunk over its whole context: a torch reference and a numba
CPU kernel.

A chunk of ``Lq`` query tokens sits at the end of a context of ``C >= Lq`` positions whose K
and V are already in the cache (``keys``/``values``: ``[slots, KVH, D]``, read at
``context_slots``); query ``i`` sees positions ``0 .. C - Lq + i``. The reference is torch's
SDPA. The kernel (float32 sums; half-precision K/V widened) works per query head on tiles of
16 queries: their scores against 16 keys at a time are 16 x 16 multiply-adds of a key block
held transposed (``[D, 16]``, so no lane sums are needed), only over the key blocks some query
of the tile sees; then each row's softmax numerators (:mod:`.softmax_lanes`) and the weighted
sum of the value rows, 4 queries at a time with their sums in registers. On one core of an
AVX-512 Xeon without AMX it took 0.72-0.93x the time of SDPA in float32 for 256-1,024-token
prompts (9 query / 3 kv heads of 64; 1.18x at 64 tokens, where its fixed costs show), and
the whole float32 SmolLM2 workload of issue 8 ran 4-5% faster with it (``results/README.md``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .softmax_lanes import exp_shifted, row_peak
from .vector_code import LANES, VEC, Args, const, lanes_of, load_lanes, multiply_add, splat

TILE = LANES            # queries per tile, and keys per block
VALUE_ROWS = 4          # queries whose weighted value sums one call holds in registers
_HALF = (torch.bfloat16, torch.float16)


def prefill_attention_reference(q, keys, values, context_slots, scale):
    """``q[Lq, H, D]`` attending causally to the ``C`` cached positions at `context_slots`;
    returns ``[Lq, H, D]``."""
    length, ctx = q.shape[0], context_slots.numel()
    k, v = keys.index_select(0, context_slots), values.index_select(0, context_slots)
    mask = None
    if ctx != length:
        query_pos = torch.arange(ctx - length, ctx, device=q.device)
        mask = query_pos[:, None] >= torch.arange(ctx, device=q.device)[None, :]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


def _dims(dims) -> int:
    return dims.count * LANES


@intrinsic
def tile_scores(typingctx, queries_t, keys_t, block, scores, column, dims):
    """``scores[r, column + j] = sum_d queries_t[d, r] * keys_t[block, d, j]`` for
    ``r, j < 16``; the head dim is ``16 * len(dims)``."""
    sig = types.void(queries_t, keys_t, block, scores, column, dims)
    dim = _dims(dims)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args,
                 ("queries_t", "keys_t", "block", "scores", "column"))
        sums = [lanes_of(0.0) for _ in range(TILE)]
        for d in range(dim):
            keys = load_lanes(builder, a.pointer(a.keys_t, a.block, const(d), const(0)),
                              types.float32)
            query_row = a.pointer(a.queries_t, const(d), const(0))
            for r in range(TILE):
                query = splat(builder, builder.load(builder.gep(query_row, [const(r)])))
                sums[r] = multiply_add(builder, query, keys, sums[r])
        for r, total in enumerate(sums):
            target = a.pointer(a.scores, const(r), a.column)
            builder.store(total, builder.bitcast(target, VEC.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def tile_values(typingctx, weights, first, values, kv_head, count, sums, dims):
    """``sums[r] = sum_{t < count} weights[first + r, t] * values[t, kv_head]`` for
    ``r < VALUE_ROWS``."""
    sig = types.void(weights, first, values, kv_head, count, sums, dims)
    chunks = dims.count

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args,
                 ("weights", "first", "values", "kv_head", "count", "sums"))
        totals = [[cgutils.alloca_once_value(builder, lanes_of(0.0)) for _ in range(chunks)]
                  for _ in range(VALUE_ROWS)]
        weight_rows = [a.pointer(a.weights, builder.add(a.first, const(r)), const(0))
                       for r in range(VALUE_ROWS)]
        with cgutils.for_range(builder, a.count) as loop:
            value_row = a.pointer(a.values, loop.index, a.kv_head, const(0))
            value = [load_lanes(builder, builder.gep(value_row, [const(c * LANES)]),
                                types.float32) for c in range(chunks)]
            for weight_row, total in zip(weight_rows, totals):
                weight = splat(builder, builder.load(builder.gep(weight_row, [loop.index])))
                for v, t in zip(value, total):
                    builder.store(multiply_add(builder, weight, v, builder.load(t)), t)
        for r, total in enumerate(totals):
            out_row = a.pointer(a.sums, const(r), const(0))
            for c, t in enumerate(total):
                target = builder.bitcast(builder.gep(out_row, [const(c * LANES)]),
                                         VEC.as_pointer())
                builder.store(builder.load(t), target, align=4)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, fastmath=False)
def _load_tile(q, first, rows, head, scale, queries_t):
    """``queries_t[d, r] = scale * q[first + r, head, d]`` for ``r < rows``; 0 beyond."""
    for r in range(TILE):
        for d in range(q.shape[2]):
            queries_t[d, r] = q[first + r, head, d] * scale if r < rows else np.float32(0.0)


@numba.njit(cache=True, fastmath=False)
def _softmax_rows(scores, rows, first_seen, width, totals):
    """Row ``r`` of the tile sees ``first_seen + r`` keys: its scores become softmax
    numerators (their sums in ``totals``) and the rest of its ``width`` columns 0."""
    for r in range(rows):
        seen = first_seen + r
        row = scores[r]
        totals[r] = exp_shifted(row, seen, row_peak(row, seen))
        for t in range(seen, width):
            row[t] = 0.0


@numba.njit(cache=True, fastmath=False)
def _prefill_kernel(q, keys_t, values, offset, scale, out, dims):
    """``out[i, h] = softmax(scale * q[i, h] . K[:offset + i + 1]) V`` with ``keys_t`` the
    keys of each kv head in transposed blocks ``[KVH, blocks, D, 16]`` (zero past the
    context) and ``values`` ``[C, KVH, D]``."""
    length, heads, dim = q.shape
    kv_heads, blocks = keys_t.shape[0], keys_t.shape[1]
    group = heads // kv_heads
    scores = np.empty((TILE, blocks * TILE), dtype=np.float32)
    queries_t = np.empty((dim, TILE), dtype=np.float32)
    totals = np.empty(TILE, dtype=np.float32)
    sums = np.empty((VALUE_ROWS, dim), dtype=np.float32)
    for head in range(heads):
        kv_head = head // group
        for first in range(0, length, TILE):
            rows = min(TILE, length - first)
            _load_tile(q, first, rows, head, scale, queries_t)
            width = offset + first + rows              # keys the tile's last query sees
            for b in range((width + TILE - 1) // TILE):
                tile_scores(queries_t, keys_t[kv_head], b, scores, b * TILE, dims)
            _softmax_rows(scores, rows, offset + first + 1, width, totals)
            for r0 in range(0, rows, VALUE_ROWS):
                tile_values(scores, r0, values, kv_head, width, sums, dims)
                for r in range(min(VALUE_ROWS, rows - r0)):
                    for d in range(dim):
                        out[first + r0 + r, head, d] = sums[r, d] / totals[r0 + r]


def prefill_attention_numba(q, keys, values, context_slots, scale):
    """Numba version of :func:`prefill_attention_reference` for CPU tensors with a head dim
    that is a multiple of 16; returns float32 ``[Lq, H, D]``."""
    ctx, kv_heads, dim = context_slots.numel(), keys.shape[1], keys.shape[2]
    blocks = (ctx + TILE - 1) // TILE
    k = torch.zeros(blocks * TILE, kv_heads, dim, dtype=torch.float32)
    k[:ctx] = keys.index_select(0, context_slots)
    keys_t = k.view(blocks, TILE, kv_heads, dim).permute(2, 0, 3, 1).contiguous()
    v = values.index_select(0, context_slots).float()
    out = torch.empty(q.shape, dtype=torch.float32)
    _prefill_kernel(q.float().contiguous().numpy(), keys_t.numpy(), v.numpy(),
                    ctx - q.shape[0], np.float32(scale), out.numpy(),
                    (0,) * (dim // LANES))
    return out


def prefill_attention(q, keys, values, context_slots, scale, half_by_sdpa: bool = False):
    """The entry point the model calls. CPU tensors with a head dim that is a multiple of 16
    run the numba kernel, except half-precision ones when `half_by_sdpa` (the caller's choice:
    on a CPU with AMX, SDPA's bfloat16 took about half the kernel's time, see
    `mpiserve.cpu_features.has_matrix_units`); everything else runs the reference."""
    if (q.device.type == "cpu" and q.shape[-1] % LANES == 0
            and q.dtype == keys.dtype == values.dtype
            and (q.dtype == torch.float32 or (q.dtype in _HALF and not half_by_sdpa))):
        return prefill_attention_numba(q, keys, values, context_slots, scale).to(q.dtype)
    return prefill_attention_reference(q, keys, values, context_slots, scale)

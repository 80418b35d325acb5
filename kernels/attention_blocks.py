"""Decode attention over blocks of up to 16 cached positions, written as 16-lane LLVM vectors.

Written as scalar loops, the kernel left LLVM one horizontal sum per dot product (nine per
cached position for 9 query heads) and the weighted-value sums in memory, a load and a store
per multiply-add. Here a block's scores are 16 dot products whose lane sums are added in one
transpose tree (15 vector additions for all 16), and the value sums stay in registers across the
block. Both work on one page's rows ``page[slot:slot + rows, kv_head]`` (``page`` is
``[page_size, kv_heads, head_dim]``, float32 or half-precision bits as in
``paged_attention``) for query heads ``first_head ..`` that share that kv head, and as each
row is read they ask the CPU for the same row of a page further on (``ahead``; the page
itself when there is none). One row's cache lines at a time keep the requests in step with
the arithmetic: the same lines asked for a block at a time, 192 requests in a burst for a
page of SmolLM2, held up the arithmetic while they queued (22 against 17.5 GB/s of K/V read
from memory with one burst per page, ``results/README.md``). The head dim
(a multiple of 16) and the number of heads are known when the code is compiled, which unrolls
over both: they come as ``shape`` (see :func:`block_shape`). All sums are float32. The vector
helpers are :mod:`.vector_code`'s.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .vector_code import (
    I64,
    LANES,
    VEC,
    Args,
    const,
    greater,
    lane_max,
    lane_sums,
    lanes_of,
    load_lanes,
    multiply_add,
    prefetch,
    splat,
    splat_int,
    store_lanes,
)

MAX_HEADS = 16              # query heads one call serves at most (a larger group: more calls)


def block_shape(head_dim: int, heads: int) -> tuple[tuple[int, ...], ...]:
    """The ``shape`` argument of the intrinsics: ``heads`` tuples of ``head_dim // 16`` zeros,
    whose numba type carries both counts, so that each pair compiles to its own unrolled code
    and a call costs no more than any other argument."""
    return ((0,) * (head_dim // LANES),) * heads


def heads_per_call(group: int, half_precision: bool) -> int:
    """How many of a kv head's `group` query heads one call serves. Half-precision K/V: the
    largest divisor of `group` up to `MAX_HEADS`, so that a row is loaded and widened once for
    all of them. Float32: one, each call re-reading the block's rows from L1; with all of them
    the lane sums of every head were live at once and spilled. On an AVX-512-BF16 EPYC, 30
    layers of 24 sequences at 1,000 tokens of context took 36.3 against 45.1 ms (9/3 heads),
    26.4 against 29.1 (8/2) and 129.7 against 173.7 (32/8) in float32, while bfloat16 (9/3)
    took 29.0 against 24.1 ms with one head a call (``results/README.md``)."""
    if not half_precision:
        return 1
    return max(d for d in range(1, MAX_HEADS + 1) if group % d == 0)


def _counts_of(shape) -> tuple[int, int]:
    """(heads, chunks) of a `block_shape` type."""
    if not (isinstance(shape, types.UniTuple) and isinstance(shape.dtype, types.UniTuple)
            and shape.count and shape.dtype.count):
        raise TypingError(f"shape must come from block_shape(), got {shape}")
    return shape.count, shape.dtype.count


def _prefetch_row(a: Args, row, chunks: int) -> None:
    """Ask for the cache lines of ``ahead[slot + row, kv_head]`` (one request per 16 elements:
    a line of float32, half a line of 16-bit values)."""
    start = a.pointer(a.ahead, a.builder.add(a.slot, row), a.kv_head, const(0))
    for c in range(chunks):
        prefetch(a.builder, a.builder.gep(start, [const(c * LANES)]), 3)


_SCORE_ARGS = ("queries", "first_head", "page", "ahead", "slot", "kv_head", "rows", "scale",
               "scores", "t0", "peaks")


@intrinsic
def block_scores(typingctx, queries, first_head, page, ahead, slot, kv_head, rows, scale, scores,
                 t0, peaks, shape):
    """``scores[h, t0 + i] = scale * (queries[h] . page[slot + i, kv_head])`` for ``i < rows``
    (at most 16) and each query head ``h`` of the ``len(shape)`` from ``first_head``;
    ``peaks[h]`` becomes the larger of itself and the block's largest score (a NaN score
    may or may not reach it; it reaches the softmax either way)."""
    sig = types.void(queries, first_head, page, ahead, slot, kv_head, rows, scale, scores, t0,
                     peaks, shape)
    heads, chunks = _counts_of(shape)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, _SCORE_ARGS)
        head_ids = [builder.add(a.first_head, const(g)) for g in range(heads)]
        queries = [[load_lanes(builder, a.pointer(a.queries, head, const(c * LANES)),
                                types.float32) for c in range(chunks)] for head in head_ids]
        # dots[g * 16 + row]: the row's 16 partial sums for head g; rows past `rows` are 0
        # (a whole block writes every row, so only a partial one clears them first)
        dots = cgutils.alloca_once(builder, VEC, size=heads * LANES)
        with builder.if_then(builder.icmp_unsigned("<", a.rows, const(LANES))):
            cgutils.memset(builder, dots, const(heads * LANES * 4 * LANES), 0)
        with cgutils.for_range(builder, a.rows) as row_loop:
            key_row = a.pointer(a.page, builder.add(a.slot, row_loop.index), a.kv_head, const(0))
            keys = [load_lanes(builder, builder.gep(key_row, [const(c * LANES)]),
                                signature.args[2].dtype) for c in range(chunks)]
            _prefetch_row(a, row_loop.index, chunks)
            for g, query in enumerate(queries):
                total = ir.Constant(VEC, None)
                for q, key in zip(query, keys):
                    total = multiply_add(builder, q, key, total)
                builder.store(total, builder.gep(dots, [builder.add(row_loop.index,
                                                                    const(g * LANES))]))
        scale = splat(builder, a.scale)
        in_block = builder.icmp_unsigned("<", ir.Constant(ir.VectorType(I64, LANES),
                                                           list(range(LANES))),
                                         splat_int(builder, a.rows))
        minus_inf = lanes_of(float("-inf"))
        lanes = cgutils.alloca_once(builder, VEC)
        for g, head in enumerate(head_ids):
            block = [builder.load(builder.gep(dots, [const(g * LANES + i)]))
                     for i in range(LANES)]
            result = builder.fmul(lane_sums(builder, block), scale)
            store_lanes(builder, result, a.rows, a.pointer(a.scores, head, a.t0), lanes)
            peak = a.pointer(a.peaks, head)
            builder.store(greater(builder, builder.load(peak),
                                   lane_max(builder, builder.select(in_block, result,
                                                                     minus_inf))), peak)
        return context.get_dummy_value()

    return sig, codegen


_VALUE_ARGS = ("weights", "first_head", "t0", "page", "ahead", "slot", "kv_head", "rows",
               "sums")


@intrinsic
def block_values(typingctx, weights, first_head, t0, page, ahead, slot, kv_head, rows, sums,
                 shape):
    """``sums[h] += sum_i weights[h, t0 + i] * page[slot + i, kv_head]`` over ``i < rows``
    (at most 16) for each query head ``h`` of the ``len(shape)`` from ``first_head``; the
    block is summed in float32 accumulators held in registers before it joins ``sums``."""
    sig = types.void(weights, first_head, t0, page, ahead, slot, kv_head, rows, sums, shape)
    heads, chunks = _counts_of(shape)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, _VALUE_ARGS)
        head_ids = [builder.add(a.first_head, const(g)) for g in range(heads)]
        accumulators = [[cgutils.alloca_once_value(builder, ir.Constant(VEC, None))
                         for _ in range(chunks)] for _ in head_ids]
        with cgutils.for_range(builder, a.rows) as row_loop:
            value_row = a.pointer(a.page, builder.add(a.slot, row_loop.index), a.kv_head,
                                  const(0))
            values = [load_lanes(builder, builder.gep(value_row, [const(c * LANES)]),
                                  signature.args[3].dtype) for c in range(chunks)]
            _prefetch_row(a, row_loop.index, chunks)
            position = builder.add(a.t0, row_loop.index)
            for head, sums in zip(head_ids, accumulators):
                weight = splat(builder, builder.load(a.pointer(a.weights, head, position)))
                for value, total in zip(values, sums):
                    builder.store(multiply_add(builder, weight, value, builder.load(total)),
                                  total)
        for head, sums in zip(head_ids, accumulators):
            out_row = a.pointer(a.sums, head, const(0))
            for c, total in enumerate(sums):
                target = builder.bitcast(builder.gep(out_row, [const(c * LANES)]),
                                         VEC.as_pointer())
                builder.store(builder.fadd(builder.load(target, align=4), builder.load(total)),
                              target, align=4)
        return context.get_dummy_value()

    return sig, codegen

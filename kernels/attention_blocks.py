"""Decode attention over blocks of up to 16 cached positions, written as 16-lane LLVM vectors.

Written as scalar loops, the kernel left LLVM one horizontal sum per dot product (nine per
cached position for 9 query heads) and the weighted-value sums in memory, a load and a store
per multiply-add. Here a block's scores are 16 dot products whose lane sums are added in one
transpose tree (15 vector additions for all 16), and the value sums stay in registers across the
block. Both work on one page's rows ``page[slot:slot + rows, kv_head]`` (``page`` is
``[page_size, kv_heads, head_dim]``, float32 or half-precision bits as in
``paged_attention``) for query heads ``first_head ..`` that share that kv head. The head dim (a multiple of 16) and the number of heads are known when the code
is compiled, which unrolls over both: they come as ``shape`` (see :func:`block_shape`). All
sums are float32.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

LANES = 16
MAX_HEADS = 16              # query heads one call serves at most (a larger group: more calls)
_F32 = ir.FloatType()
_VEC = ir.VectorType(_F32, LANES)
_I32 = ir.IntType(32)
_I64 = ir.IntType(64)
_FUSE = ("contract",)        # a multiply and its add may fuse into one FMA


def _const(value: int) -> ir.Constant:
    return ir.Constant(_I64, value)


def _lane_mask(indices) -> ir.Constant:
    return ir.Constant(ir.VectorType(_I32, len(indices)), [ir.Constant(_I32, i) for i in indices])


def _splat(builder, scalar) -> ir.Value:
    lane = builder.insert_element(ir.Constant(_VEC, None), scalar, _const(0))
    return builder.shuffle_vector(lane, lane, _lane_mask([0] * LANES))


def _load_lanes(builder, pointer, dtype) -> ir.Value:
    """16 consecutive elements from `pointer` as float32 lanes (half precision widened exactly)."""
    if dtype == types.float32:
        return builder.load(builder.bitcast(pointer, _VEC.as_pointer()), align=4)
    bits = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(16), LANES)
                                        .as_pointer()), align=2)
    if dtype == types.uint16:                                   # IEEE half
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), LANES)), _VEC)
    wide = builder.zext(bits, ir.VectorType(_I32, LANES))       # bfloat16: the top half
    return builder.bitcast(builder.shl(wide, ir.Constant(wide.type, [16] * LANES)), _VEC)


def _multiply_add(builder, a, b, c) -> ir.Value:
    return builder.fadd(builder.fmul(a, b, flags=_FUSE), c, flags=_FUSE)


def _lane_sums(builder, vectors: list) -> ir.Value:
    """One vector whose lane i is the sum of the lanes of `vectors[i]` (16 vectors): pairs are
    folded half on half, so each level halves both the vectors and the lanes each one sums."""
    width = LANES // 2
    while len(vectors) > 1:
        low = [g * 2 * width + i for g in range(LANES // (2 * width)) for i in range(width)]
        low = low + [LANES + i for i in low]
        high = [i + width for i in low]
        vectors = [builder.fadd(builder.shuffle_vector(a, b, _lane_mask(low)),
                                builder.shuffle_vector(a, b, _lane_mask(high)))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        width //= 2
    return vectors[0]


def _splat_int(builder, value) -> ir.Value:
    vec = ir.VectorType(_I64, LANES)
    lane = builder.insert_element(ir.Constant(vec, None), value, _const(0))
    return builder.shuffle_vector(lane, lane, _lane_mask([0] * LANES))


def _greater(builder, a, b) -> ir.Value:
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


def _lane_max(builder, vector) -> ir.Value:
    """The largest lane of `vector` (NaN lanes may be passed over)."""
    width = LANES // 2
    while width:
        folded = builder.shuffle_vector(vector, vector,
                                        _lane_mask([i + width for i in range(width)]
                                                   + list(range(width, LANES))))
        vector = _greater(builder, vector, folded)
        width //= 2
    return builder.extract_element(vector, _const(0))


def _store_lanes(builder, vector, count, pointer, scratch) -> None:
    """The first `count` lanes of `vector` to the floats at `pointer`: one vector store for a
    whole block, else lane by lane through `scratch` (an alloca of one vector)."""
    whole = builder.icmp_unsigned("==", count, _const(LANES))
    with builder.if_else(whole) as (full, partial):
        with full:
            builder.store(vector, builder.bitcast(pointer, _VEC.as_pointer()), align=4)
        with partial:
            builder.store(vector, scratch)
            flat = builder.bitcast(scratch, _F32.as_pointer())
            with cgutils.for_range(builder, count) as lane_loop:
                builder.store(builder.load(builder.gep(flat, [lane_loop.index])),
                              builder.gep(pointer, [lane_loop.index]))


class _Args:
    """An intrinsic's arguments as LLVM values: arrays with their numba types, integers as
    64-bit, floats as float32."""

    def __init__(self, context, builder, signature, args, names):
        self.context, self.builder = context, builder
        for name, ty, value in zip(names, signature.args, args):
            if isinstance(ty, types.Array):
                value = (ty, context.make_array(ty)(context, builder, value))
            elif isinstance(ty, types.Integer):
                value = context.cast(builder, value, ty, types.intp)
            else:
                value = context.cast(builder, value, ty, types.float32)
            setattr(self, name, value)

    def pointer(self, array, *indices):
        ty, value = array
        return cgutils.get_item_pointer(self.context, self.builder, ty, value, list(indices))


def block_shape(head_dim: int, heads: int) -> tuple[tuple[int, ...], ...]:
    """The ``shape`` argument of the intrinsics: ``heads`` tuples of ``head_dim // 16`` zeros,
    whose numba type carries both counts, so that each pair compiles to its own unrolled code
    and a call costs no more than any other argument."""
    return ((0,) * (head_dim // LANES),) * heads


def heads_per_call(group: int) -> int:
    """How many of a kv head's `group` query heads one call serves: the largest divisor of
    `group` up to `MAX_HEADS`."""
    return max(d for d in range(1, MAX_HEADS + 1) if group % d == 0)


def _counts_of(shape) -> tuple[int, int]:
    """(heads, chunks) of a `block_shape` type."""
    if not (isinstance(shape, types.UniTuple) and isinstance(shape.dtype, types.UniTuple)
            and shape.count and shape.dtype.count):
        raise TypingError(f"shape must come from block_shape(), got {shape}")
    return shape.count, shape.dtype.count


_SCORE_ARGS = ("queries", "first_head", "page", "slot", "kv_head", "rows", "scale", "scores",
               "t0", "peaks")


@intrinsic
def block_scores(typingctx, queries, first_head, page, slot, kv_head, rows, scale, scores, t0,
                 peaks, shape):
    """``scores[h, t0 + i] = scale * (queries[h] . page[slot + i, kv_head])`` for ``i < rows``
    (at most 16) and each query head ``h`` of the ``len(shape)`` from ``first_head``;
    ``peaks[h]`` becomes the larger of itself and the block's largest score (a NaN score
    may or may not reach it; it reaches the softmax either way)."""
    sig = types.void(queries, first_head, page, slot, kv_head, rows, scale, scores, t0, peaks,
                     shape)
    heads, chunks = _counts_of(shape)

    def codegen(context, builder, signature, args):
        a = _Args(context, builder, signature, args, _SCORE_ARGS)
        head_ids = [builder.add(a.first_head, _const(g)) for g in range(heads)]
        queries = [[_load_lanes(builder, a.pointer(a.queries, head, _const(c * LANES)),
                                types.float32) for c in range(chunks)] for head in head_ids]
        # dots[g * 16 + row]: the row's 16 partial sums for head g; rows past `rows` stay 0
        dots = cgutils.alloca_once(builder, _VEC, size=heads * LANES)
        cgutils.memset(builder, dots, _const(heads * LANES * 4 * LANES), 0)
        with cgutils.for_range(builder, a.rows) as row_loop:
            key_row = a.pointer(a.page, builder.add(a.slot, row_loop.index), a.kv_head, _const(0))
            keys = [_load_lanes(builder, builder.gep(key_row, [_const(c * LANES)]),
                                signature.args[2].dtype) for c in range(chunks)]
            for g, query in enumerate(queries):
                total = ir.Constant(_VEC, None)
                for q, key in zip(query, keys):
                    total = _multiply_add(builder, q, key, total)
                builder.store(total, builder.gep(dots, [builder.add(row_loop.index,
                                                                    _const(g * LANES))]))
        scale = _splat(builder, a.scale)
        in_block = builder.icmp_unsigned("<", ir.Constant(ir.VectorType(_I64, LANES),
                                                           list(range(LANES))),
                                         _splat_int(builder, a.rows))
        minus_inf = ir.Constant(_VEC, [float("-inf")] * LANES)
        lanes = cgutils.alloca_once(builder, _VEC)
        for g, head in enumerate(head_ids):
            block = [builder.load(builder.gep(dots, [_const(g * LANES + i)]))
                     for i in range(LANES)]
            result = builder.fmul(_lane_sums(builder, block), scale)
            _store_lanes(builder, result, a.rows, a.pointer(a.scores, head, a.t0), lanes)
            peak = a.pointer(a.peaks, head)
            builder.store(_greater(builder, builder.load(peak),
                                   _lane_max(builder, builder.select(in_block, result,
                                                                     minus_inf))), peak)
        return context.get_dummy_value()

    return sig, codegen


_VALUE_ARGS = ("weights", "first_head", "t0", "page", "slot", "kv_head", "rows", "sums")


@intrinsic
def block_values(typingctx, weights, first_head, t0, page, slot, kv_head, rows, sums, shape):
    """``sums[h] += sum_i weights[h, t0 + i] * page[slot + i, kv_head]`` over ``i < rows``
    (at most 16) for each query head ``h`` of the ``len(shape)`` from ``first_head``; the
    block is summed in float32 accumulators held in registers before it joins ``sums``."""
    sig = types.void(weights, first_head, t0, page, slot, kv_head, rows, sums, shape)
    heads, chunks = _counts_of(shape)

    def codegen(context, builder, signature, args):
        a = _Args(context, builder, signature, args, _VALUE_ARGS)
        head_ids = [builder.add(a.first_head, _const(g)) for g in range(heads)]
        accumulators = [[cgutils.alloca_once_value(builder, ir.Constant(_VEC, None))
                         for _ in range(chunks)] for _ in head_ids]
        with cgutils.for_range(builder, a.rows) as row_loop:
            value_row = a.pointer(a.page, builder.add(a.slot, row_loop.index), a.kv_head,
                                  _const(0))
            values = [_load_lanes(builder, builder.gep(value_row, [_const(c * LANES)]),
                                  signature.args[3].dtype) for c in range(chunks)]
            position = builder.add(a.t0, row_loop.index)
            for head, sums in zip(head_ids, accumulators):
                weight = _splat(builder, builder.load(a.pointer(a.weights, head, position)))
                for value, total in zip(values, sums):
                    builder.store(_multiply_add(builder, weight, value, builder.load(total)),
                                  total)
        for head, sums in zip(head_ids, accumulators):
            out_row = a.pointer(a.sums, head, _const(0))
            for c, total in enumerate(sums):
                target = builder.bitcast(builder.gep(out_row, [_const(c * LANES)]),
                                         _VEC.as_pointer())
                builder.store(builder.fadd(builder.load(target, align=4), builder.load(total)),
                              target, align=4)
        return context.get_dummy_value()

    return sig, codegen

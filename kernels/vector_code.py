"""16-lane float32 vector code for numba intrinsics: loads that widen half precision,
stores that round to it, lane sums and maxima, and the arguments of an intrinsic as LLVM values.

The kernels built on it (``attention_blocks``, ``fused_rows``) are written as LLVM vectors
because numba's scalar loops over 16-bit patterns were not vectorised by LLVM. Half-precision
arrays arrive as 16-bit integers whose type names the format: ``int16`` is bfloat16, ``uint16``
IEEE half (see :data:`BITS_OF`).
"""

from __future__ import annotations

import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils

LANES = 16
# the dtype a kernel's array of each torch dtype is viewed as: half precision as 16-bit
# patterns whose integer type names the format (numba has no bfloat16 or float16 on CPU)
BITS_OF = {torch.bfloat16: torch.int16, torch.float16: torch.uint16, torch.float32: torch.float32}
F32 = ir.FloatType()
VEC = ir.VectorType(F32, LANES)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
FUSE = ("contract",)        # a multiply and its add may fuse into one FMA
_HALVES = ir.VectorType(ir.HalfType(), LANES)
_SHORTS = ir.VectorType(ir.IntType(16), LANES)


def const(value: int) -> ir.Constant:
    return ir.Constant(I64, value)


def lanes_of(value: float) -> ir.Constant:
    """A vector constant: `value` (rounded to float32) in every lane."""
    return ir.Constant(VEC, [float(np.float32(value))] * LANES)


def lane_mask(indices) -> ir.Constant:
    return ir.Constant(ir.VectorType(I32, len(indices)), [ir.Constant(I32, i) for i in indices])


def splat(builder, scalar) -> ir.Value:
    lane = builder.insert_element(ir.Constant(VEC, None), scalar, const(0))
    return builder.shuffle_vector(lane, lane, lane_mask([0] * LANES))


def load_lanes(builder, pointer, dtype) -> ir.Value:
    """16 consecutive elements from `pointer` as float32 lanes (half precision widened exactly)."""
    if dtype == types.float32:
        return builder.load(builder.bitcast(pointer, VEC.as_pointer()), align=4)
    bits = builder.load(builder.bitcast(pointer, ir.VectorType(ir.IntType(16), LANES)
                                        .as_pointer()), align=2)
    if dtype == types.uint16:                                   # IEEE half
        return builder.fpext(builder.bitcast(bits, ir.VectorType(ir.HalfType(), LANES)), VEC)
    wide = builder.zext(bits, ir.VectorType(I32, LANES))       # bfloat16: the top half
    return builder.bitcast(builder.shl(wide, ir.Constant(wide.type, [16] * LANES)), VEC)


def _ints(value: int, bits: int = 32) -> ir.Constant:
    return ir.Constant(ir.VectorType(ir.IntType(bits), LANES), [value] * LANES)


def round_lanes(builder, vector, dtype) -> ir.Value:
    """`vector` rounded to the nearest even value of `dtype` (float32: unchanged), still as
    float32 lanes. bfloat16 rounds as torch does: NaN becomes 0x7FC0, anything else adds
    0x7FFF plus its lowest kept bit and drops the low half (so overflow goes to infinity)."""
    if dtype == types.float32:
        return vector
    if dtype == types.uint16:
        return builder.fpext(builder.fptrunc(vector, _HALVES), VEC)
    bits = builder.bitcast(vector, ir.VectorType(I32, LANES))
    kept_lsb = builder.and_(builder.lshr(bits, _ints(16)), _ints(1))
    rounded = builder.and_(builder.add(builder.add(bits, _ints(0x7FFF)), kept_lsb),
                           _ints(-0x10000))
    nan = builder.fcmp_unordered("uno", vector, vector)
    return builder.bitcast(builder.select(nan, _ints(0x7FC00000), rounded), VEC)


def store_rounded(builder, vector, pointer, dtype) -> None:
    """16 float32 lanes to consecutive elements of `dtype` at `pointer`, rounded as
    :func:`round_lanes` does."""
    if dtype == types.float32:
        builder.store(vector, builder.bitcast(pointer, VEC.as_pointer()), align=4)
        return
    if dtype == types.uint16:
        bits = builder.bitcast(builder.fptrunc(vector, _HALVES), _SHORTS)
    else:
        wide = builder.bitcast(round_lanes(builder, vector, dtype), ir.VectorType(I32, LANES))
        bits = builder.trunc(builder.lshr(wide, _ints(16)), _SHORTS)
    builder.store(bits, builder.bitcast(pointer, _SHORTS.as_pointer()), align=2)


def prefetch(builder, pointer, locality: int) -> None:
    """Ask the CPU to fetch the cache line at `pointer` for reading (``llvm.prefetch``);
    `locality` 3 keeps it in every cache level, 2 in L2 and beyond. Never faults."""
    byte_ptr = ir.IntType(8).as_pointer()
    fnty = ir.FunctionType(ir.VoidType(), [byte_ptr, I32, I32, I32])
    fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=fnty)
    flags = [ir.Constant(I32, flag) for flag in (0, locality, 1)]
    builder.call(fn, [builder.bitcast(pointer, byte_ptr)] + flags)


def multiply_add(builder, a, b, c) -> ir.Value:
    return builder.fadd(builder.fmul(a, b, flags=FUSE), c, flags=FUSE)


def lane_sums(builder, vectors: list) -> ir.Value:
    """One vector whose lane i is the sum of the lanes of `vectors[i]` (16 vectors): pairs are
    folded half on half, so each level halves both the vectors and the lanes each one sums."""
    width = LANES // 2
    while len(vectors) > 1:
        low = [g * 2 * width + i for g in range(LANES // (2 * width)) for i in range(width)]
        low = low + [LANES + i for i in low]
        high = [i + width for i in low]
        vectors = [builder.fadd(builder.shuffle_vector(a, b, lane_mask(low)),
                                builder.shuffle_vector(a, b, lane_mask(high)))
                   for a, b in zip(vectors[0::2], vectors[1::2])]
        width //= 2
    return vectors[0]


def splat_int(builder, value) -> ir.Value:
    vec = ir.VectorType(I64, LANES)
    lane = builder.insert_element(ir.Constant(vec, None), value, const(0))
    return builder.shuffle_vector(lane, lane, lane_mask([0] * LANES))


def greater(builder, a, b) -> ir.Value:
    return builder.select(builder.fcmp_ordered(">", a, b), a, b)


def lane_max(builder, vector) -> ir.Value:
    """The largest lane of `vector` (NaN lanes may be passed over)."""
    width = LANES // 2
    while width:
        folded = builder.shuffle_vector(vector, vector,
                                        lane_mask([i + width for i in range(width)]
                                                   + list(range(width, LANES))))
        vector = greater(builder, vector, folded)
        width //= 2
    return builder.extract_element(vector, const(0))


def store_lanes(builder, vector, count, pointer, scratch) -> None:
    """The first `count` lanes of `vector` to the floats at `pointer`: one vector store for a
    whole block, else lane by lane through `scratch` (an alloca of one vector)."""
    whole = builder.icmp_unsigned("==", count, const(LANES))
    with builder.if_else(whole) as (full, partial):
        with full:
            builder.store(vector, builder.bitcast(pointer, VEC.as_pointer()), align=4)
        with partial:
            builder.store(vector, scratch)
            flat = builder.bitcast(scratch, F32.as_pointer())
            with cgutils.for_range(builder, count) as lane_loop:
                builder.store(builder.load(builder.gep(flat, [lane_loop.index])),
                              builder.gep(pointer, [lane_loop.index]))


class Args:
    """An intrinsic's arguments as LLVM values: arrays with their numba types, integers as
    64-bit, floats as float32, None as None."""

    def __init__(self, context, builder, signature, args, names):
        self.context, self.builder = context, builder
        for name, ty, value in zip(names, signature.args, args):
            if isinstance(ty, types.NoneType):
                value = None
            elif isinstance(ty, types.Array):
                value = (ty, context.make_array(ty)(context, builder, value))
            elif isinstance(ty, types.Integer):
                value = context.cast(builder, value, ty, types.intp)
            else:
                value = context.cast(builder, value, ty, types.float32)
            setattr(self, name, value)

    def pointer(self, array, *indices):
        ty, value = array
        return cgutils.get_item_pointer(self.context, self.builder, ty, value, list(indices))

"""Softmax numerators of one row of float32 scores, as 16-lane vector code.

``row_peak`` is the row's largest score; ``exp_shifted`` replaces each score ``x`` by
``exp(x - peak)`` and returns their sum. The exponential is Cody-Waite range reduction and the
Cephes polynomial (within 1 ulp of ``expf`` for arguments in ``[_EXP_FLOOR, 0]``), written as
LLVM vectors because numba's scalar loop of it was not vectorised (in a prefill, where a layer
takes millions of exponentials, that loop was most of the attention's time). Arguments below
``_EXP_FLOOR`` give 0; a NaN stays NaN. The sum adds the lanes' partial sums at the end.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .vector_code import (
    F32,
    I32,
    I64,
    LANES,
    VEC,
    Args,
    const,
    greater,
    lane_max,
    lanes_of,
    multiply_add,
    splat,
    splat_int,
    store_lanes,
)

_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375                   # ln 2 in 9 significant bits: n * _LN2_HI is exact
_LN2_LO = -2.12194440e-4                # ln 2 - _LN2_HI
_EXP_POLY = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2,
             1.6666665459e-1, 5.0000001201e-1)
_EXP_FLOOR = -87.33654                  # ln(FLT_MIN); exp of anything below is taken as 0
_FUSE = ("contract",)
_INTS = ir.VectorType(I32, LANES)


def exp_lanes(builder, x) -> ir.Value:
    """``exp(x)`` of each lane, for ``x <= 0``."""
    floor = lanes_of(_EXP_FLOOR)
    below = builder.fcmp_ordered("<", x, floor)
    clamped = builder.select(below, floor, x)
    round_down = cgutils.get_or_insert_function(builder.module, ir.FunctionType(VEC, [VEC]),
                                                "llvm.floor.v16f32")
    n = builder.call(round_down, [multiply_add(builder, clamped, lanes_of(_LOG2E),
                                               lanes_of(0.5))])
    r = builder.fsub(builder.fsub(clamped, builder.fmul(n, lanes_of(_LN2_HI), flags=_FUSE),
                                  flags=_FUSE),
                     builder.fmul(n, lanes_of(_LN2_LO), flags=_FUSE), flags=_FUSE)
    poly = lanes_of(_EXP_POLY[0])
    for c in _EXP_POLY[1:]:
        poly = multiply_add(builder, poly, r, lanes_of(c))
    e_r = builder.fadd(multiply_add(builder, poly, builder.fmul(r, r, flags=_FUSE), r),
                       lanes_of(1.0), flags=_FUSE)
    nan = builder.fcmp_unordered("uno", n, n)      # 2^n of a NaN lane: any finite power
    power = builder.fptosi(builder.select(nan, lanes_of(0.0), n), _INTS)
    power = builder.shl(builder.add(power, ir.Constant(_INTS, [127] * LANES)),
                        ir.Constant(_INTS, [23] * LANES))
    value = builder.fmul(e_r, builder.bitcast(power, VEC))
    return builder.select(below, lanes_of(0.0), value)


def _row_start(a):
    return a.pointer(a.row, const(0))


def _chunk(builder, start, index):
    """Vector `index` (16 floats each) of the row at `start`."""
    return builder.bitcast(builder.gep(start, [builder.mul(index, const(LANES))]),
                           VEC.as_pointer())


@intrinsic
def row_peak(typingctx, row, count):
    """The largest of ``row[:count]`` (``count >= 1``; NaNs may be passed over)."""
    sig = types.float32(row, count)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, ("row", "count"))
        start = _row_start(a)
        best = cgutils.alloca_once_value(builder, lanes_of(float("-inf")))
        whole = builder.udiv(a.count, const(LANES))
        with cgutils.for_range(builder, whole) as loop:
            chunk = _chunk(builder, start, loop.index)
            builder.store(greater(builder, builder.load(chunk, align=4), builder.load(best)),
                          best)
        peak = cgutils.alloca_once_value(builder, lane_max(builder, builder.load(best)))
        done = builder.mul(whole, const(LANES))
        with cgutils.for_range(builder, builder.sub(a.count, done)) as loop:
            x, so_far = builder.load(builder.gep(start, [builder.add(done, loop.index)])), \
                builder.load(peak)
            builder.store(builder.select(builder.fcmp_ordered(">", x, so_far), x, so_far), peak)
        return builder.load(peak)

    return sig, codegen


@intrinsic
def exp_shifted(typingctx, row, count, peak):
    """``row[t] = exp(row[t] - peak)`` for ``t < count``; returns their sum."""
    sig = types.float32(row, count, peak)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, ("row", "count", "peak"))
        start, shift = _row_start(a), splat(builder, a.peak)
        total = cgutils.alloca_once_value(builder, lanes_of(0.0))
        whole = builder.udiv(a.count, const(LANES))
        with cgutils.for_range(builder, whole) as loop:
            chunk = _chunk(builder, start, loop.index)
            e = exp_lanes(builder, builder.fsub(builder.load(chunk, align=4), shift))
            builder.store(e, chunk, align=4)
            builder.store(builder.fadd(builder.load(total), e), total)
        done = builder.mul(whole, const(LANES))
        rest = builder.sub(a.count, done)
        tail = builder.gep(start, [done])
        scratch = cgutils.alloca_once_value(builder, lanes_of(0.0))
        lanes = builder.bitcast(scratch, F32.as_pointer())
        with cgutils.for_range(builder, rest) as loop:
            builder.store(builder.load(builder.gep(tail, [loop.index])),
                          builder.gep(lanes, [loop.index]))
        in_row = builder.icmp_unsigned("<", ir.Constant(ir.VectorType(I64, LANES),
                                                         list(range(LANES))),
                                       splat_int(builder, rest))
        e = builder.select(in_row, exp_lanes(builder, builder.fsub(builder.load(scratch), shift)),
                           lanes_of(0.0))
        store_lanes(builder, e, rest, tail, scratch)
        sums = builder.fadd(builder.load(total), e)
        result = builder.extract_element(sums, const(0))
        for i in range(1, LANES):
            result = builder.fadd(result, builder.extract_element(sums, const(i)))
        return result

    return sig, codegen

"""A layer's elementwise chains, one pass over each row in 16-lane vector code.

Torch runs each step of a chain as its own operator: about nine passes over the rows for a
residual sum and the RMS norm after it, five for the rotary embedding. Here each chain is one
pass over a row (two for the norm), widening half precision to float32 as it loads and
rounding where torch's operators round, so that:

- the rotary embedding and the residual sum are bit-identical to the torch reference (their
  products are exact in float32, and every sum and product is rounded to the half type as
  torch rounds it);
- the norm differs only in the order its squares are summed, which can round the normed value
  the other way in rare elements (and the weight's product of it once more: two units in the
  last place at most). So it serves bfloat16 and float16 only: float32 keeps transformers'
  operators, and with them its roundings;
- the rotation also serves float32, where each product and the sum are one IEEE operation,
  as torch's are (no fused multiply-add): bit-identical again.

SiLU times up is not here: written the same way it ran no faster than torch's operators (both
are bound by the exp and the division, not by memory).

Half-precision arrays arrive as 16-bit patterns (``int16`` bfloat16, ``uint16`` float16), and
rows must have a length that is a multiple of 16 (rotary: head dims a multiple of 32);
:func:`eligible` says when the tensors qualify, and callers keep torch for anything else.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.core.errors import TypingError
from numba.extending import intrinsic

from .vector_code import (
    BITS_OF,
    LANES,
    VEC,
    Args,
    const,
    lane_sums,
    load_lanes,
    multiply_add,
    round_lanes,
    splat,
    store_rounded,
)

HALF = (torch.bfloat16, torch.float16)


def _element(array) -> types.Type:
    if not (isinstance(array, types.Array)
            and array.dtype in (types.int16, types.uint16, types.float32)):
        raise TypingError(f"expected float32 or 16-bit patterns of a half-precision array, "
                          f"got {array}")
    return array.dtype


def _chunks(a: Args, array) -> ir.Value:
    """How many 16-lane chunks a row of the 2-D `array` holds."""
    _, value = array
    length = a.builder.extract_value(value.shape, 1)
    return a.builder.udiv(length, const(LANES))


@intrinsic
def _sum_squares(typingctx, x, delta, row, stream):
    """The float32 sum of squares of row ``row`` of ``x`` (of ``x + delta`` rounded to the half
    type when ``delta`` is an array, that sum being written to ``stream``'s row; with ``delta``
    None, ``stream`` is not written)."""
    dtype = _element(x)
    fused = not isinstance(delta, types.NoneType)
    sig = types.float32(x, delta, row, stream)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, ("x", "delta", "row", "stream"))
        accumulator = cgutils.alloca_once_value(builder, ir.Constant(VEC, None))
        with cgutils.for_range(builder, _chunks(a, a.x)) as loop:
            column = builder.mul(loop.index, const(LANES))
            lanes = load_lanes(builder, a.pointer(a.x, a.row, column), dtype)
            if fused:
                lanes = round_lanes(builder, builder.fadd(
                    lanes, load_lanes(builder, a.pointer(a.delta, a.row, column), dtype)), dtype)
                store_rounded(builder, lanes, a.pointer(a.stream, a.row, column), dtype)
            builder.store(multiply_add(builder, lanes, lanes, builder.load(accumulator)),
                          accumulator)
        sums = lane_sums(builder, [builder.load(accumulator)] + [ir.Constant(VEC, None)]
                         * (LANES - 1))
        return builder.extract_element(sums, const(0))

    return sig, codegen


@intrinsic
def _scale_row(typingctx, x, row, factor, weight, out):
    """``out[row] = weight * half(x[row] * factor)``, each product rounded to the half type."""
    dtype = _element(x)
    sig = types.void(x, row, factor, weight, out)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, ("x", "row", "factor", "weight", "out"))
        factor = splat(builder, a.factor)
        with cgutils.for_range(builder, _chunks(a, a.x)) as loop:
            column = builder.mul(loop.index, const(LANES))
            lanes = load_lanes(builder, a.pointer(a.x, a.row, column), dtype)
            normed = round_lanes(builder, builder.fmul(lanes, factor), dtype)
            scaled = builder.fmul(load_lanes(builder, a.pointer(a.weight, column), dtype), normed)
            store_rounded(builder, scaled, a.pointer(a.out, a.row, column), dtype)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _rotate_row(typingctx, x, row, heads, cos, sin):
    """Rotates the first ``heads`` heads of ``x[row]`` (``[heads_total * D]``, ``D`` the width
    of ``cos``) in place: ``half(half(x * cos) + half(rotate_half(x) * sin))``."""
    dtype = _element(x)
    sig = types.void(x, row, heads, cos, sin)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, ("x", "row", "heads", "cos", "sin"))
        dim = builder.extract_value(a.cos[1].shape, 1)
        half = builder.udiv(dim, const(2))
        chunks = builder.udiv(half, const(LANES))

        def rounded_product(u, v):
            return round_lanes(builder, builder.fmul(u, v), dtype)

        def load(array, *index):
            return load_lanes(builder, a.pointer(array, *index), dtype)

        with cgutils.for_range(builder, a.heads) as head_loop:
            start = builder.mul(head_loop.index, dim)
            with cgutils.for_range(builder, chunks) as loop:
                low = builder.mul(loop.index, const(LANES))
                high = builder.add(low, half)
                first = load(a.x, a.row, builder.add(start, low))
                second = load(a.x, a.row, builder.add(start, high))
                new_first = builder.fadd(rounded_product(first, load(a.cos, a.row, low)),
                                         rounded_product(builder.fneg(second),
                                                         load(a.sin, a.row, low)))
                new_second = builder.fadd(rounded_product(second, load(a.cos, a.row, high)),
                                          rounded_product(first, load(a.sin, a.row, high)))
                store_rounded(builder, new_first, a.pointer(a.x, a.row, builder.add(start, low)),
                              dtype)
                store_rounded(builder, new_second,
                              a.pointer(a.x, a.row, builder.add(start, high)), dtype)
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True)
def _norm_rows(x, delta, weight, eps, stream, out):
    """Normed rows of ``stream = x + delta`` into ``out``; with ``delta`` None (compiled apart),
    ``stream`` is ``x`` itself."""
    width = np.float32(x.shape[1])
    for row in range(x.shape[0]):
        squares = _sum_squares(x, delta, row, stream)
        factor = np.float32(1.0) / np.sqrt(squares / width + eps)
        _scale_row(stream, row, factor, weight, out)


@numba.njit(cache=True)
def _rotate_rows(x, heads, cos, sin):
    for row in range(x.shape[0]):
        _rotate_row(x, row, heads, cos, sin)


def eligible(*tensors: torch.Tensor, multiple: int = LANES, dtypes=HALF) -> bool:
    """Whether these kernels take the tensors: CPU, one of `dtypes` for all, rows of a
    length that is a multiple of `multiple`, each row contiguous."""
    first = tensors[0]
    return first.dtype in dtypes and all(
        t.device.type == "cpu" and t.dtype == first.dtype and t.shape[-1] % multiple == 0
        and t.stride(-1) == 1 for t in tensors)


def _bits(tensor: torch.Tensor) -> np.ndarray:
    return tensor.view(BITS_OF[tensor.dtype]).numpy()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(``weight * half(s * rsqrt(mean(s^2) + eps))``, ``s``) for ``s = x`` (``x + delta``
    rounded when `delta` is given) over the rows of 2-D `x`."""
    out = torch.empty_like(x)
    stream = x if delta is None else torch.empty_like(x)
    _norm_rows(_bits(x), None if delta is None else _bits(delta), _bits(weight),
               np.float32(eps), _bits(stream), _bits(out))
    return out, stream


def rotate_heads_(x: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates, in place, the first `heads` heads of each row of 2-D `x` by the rows of
    `cos`/`sin` (``[rows, head_dim]``)."""
    _rotate_rows(_bits(x), heads, _bits(cos), _bits(sin))

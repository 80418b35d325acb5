"""kernels.prefill_attention: the numba kernel against the SDPA reference, and the dispatch."""

from __future__ import annotations

import pytest
import torch

from mpiserve.kernels import (
    prefill_attention,
    prefill_attention_numba,
    prefill_attention_reference,
)

HALF_ROUNDING = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def prefill_case(length, context, heads, kv_heads, dim, dtype=torch.float32, seed=0):
    """(q, keys, values, context_slots, scale): the context's slots scattered in a cache with
    slots no one reads, which hold NaN (a kernel reading one would show it)."""
    gen = torch.Generator().manual_seed(seed)
    slots = context + 9
    keys = torch.full((slots, kv_heads, dim), float("nan"))
    values = torch.full((slots, kv_heads, dim), float("nan"))
    context_slots = torch.randperm(slots, generator=gen)[:context]
    keys[context_slots] = torch.randn(context, kv_heads, dim, generator=gen)
    values[context_slots] = torch.randn(context, kv_heads, dim, generator=gen)
    q = torch.randn(length, heads, dim, generator=gen)
    return q.to(dtype), keys.to(dtype), values.to(dtype), context_slots, dim ** -0.5


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (9, 3), (6, 1)])
@pytest.mark.parametrize("dim", [16, 64, 128])
@pytest.mark.parametrize("length,context", [(1, 1), (15, 15), (16, 16), (17, 40), (70, 70),
                                            (33, 200)])
def test_numba_matches_reference_float32(length, context, heads, kv_heads, dim):
    """Whole prompts and chunks after earlier context, tiles and key blocks cut at every
    place: the reference's softmax to float32 roundings."""
    case = prefill_case(length, context, heads, kv_heads, dim, seed=length + context)
    out = prefill_attention_numba(*case)
    assert out.shape == (length, heads, dim) and out.dtype == torch.float32
    torch.testing.assert_close(out, prefill_attention_reference(*case), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_numba_half_precision_widens_exactly(dtype):
    """Half-precision K/V and queries are widened exactly: the float32 reference of the same
    (rounded) values, to float32 roundings; the dispatch rounds once, to the dtype."""
    q, keys, values, slots, scale = prefill_case(37, 90, 9, 3, 64, dtype=dtype)
    wide = (q.float(), keys.float(), values.float(), slots, scale)
    out = prefill_attention_numba(q, keys, values, slots, scale)
    torch.testing.assert_close(out, prefill_attention_reference(*wide), rtol=1e-5, atol=1e-5)
    rounded = prefill_attention(q, keys, values, slots, scale)
    assert rounded.dtype == dtype and torch.equal(rounded, out.to(dtype))


def test_dispatch():
    """float32 and (unless the caller picks SDPA for it) half precision take the kernel; half
    precision with `half_by_sdpa`, float64 and odd head dims take SDPA."""
    case = prefill_case(20, 30, 4, 2, 64)
    assert torch.equal(prefill_attention(*case), prefill_attention_numba(*case))
    half = prefill_case(20, 30, 4, 2, 64, dtype=torch.bfloat16)
    assert torch.equal(prefill_attention(*half, half_by_sdpa=True),
                       prefill_attention_reference(*half))
    odd = prefill_case(20, 30, 4, 2, 24)
    assert torch.equal(prefill_attention(*odd), prefill_attention_reference(*odd))
    wide = prefill_case(5, 5, 2, 1, 16, dtype=torch.float64)
    assert prefill_attention(*wide).dtype == torch.float64

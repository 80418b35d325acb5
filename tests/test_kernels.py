"""mpiserve.kernels: numba kernels against their torch references, references against
plain torch."""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mpiserve.kernels import (
    pack_slots,
    pack_slots_numba,
    pack_slots_reference,
    paged_decode_attention,
    paged_decode_attention_numba,
    paged_decode_attention_reference,
    unpack_slots,
    unpack_slots_numba,
    unpack_slots_reference,
)
from mpiserve.kernels.attention_blocks import block_shape, block_values
from mpiserve.kernels.softmax_lanes import exp_shifted, row_peak

HEADS = [(4, 4), (8, 2), (6, 1)]  # (query heads, kv heads): MHA, GQA, MQA
HEAD_DIMS = [16, 64, 128]
PAGE_SIZES = [1, 4, 16]
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def context_lengths(page_size: int) -> list[int]:
    """One token, exactly on page boundaries, a boundary + 1, and an odd length."""
    return [1, page_size, 2 * page_size, page_size + 1, 3 * page_size - 1, 37]


def paged_case(heads: int, kv_heads: int, dim: int, page_size: int, lens: list[int],
               dtype=torch.float32, seed: int = 0):
    """Random (q, kv, page_table, context_lens, scale) with every sequence's pages taken
    from a shuffled pool and the unused tail of the page table holding an invalid id."""
    gen = torch.Generator().manual_seed(seed)
    pages_per_seq = [-(-n // page_size) for n in lens]
    num_pages = sum(pages_per_seq) + 3
    order = torch.randperm(num_pages, generator=gen).to(torch.int32)
    page_table = torch.full((len(lens), max(pages_per_seq) + 1), num_pages + 7,
                            dtype=torch.int32)
    used = 0
    for b, count in enumerate(pages_per_seq):
        page_table[b, :count] = order[used:used + count]
        used += count
    kv = torch.randn(2, num_pages, page_size, kv_heads, dim, generator=gen).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=gen).to(dtype)
    context_lens = torch.tensor(lens, dtype=torch.int32)
    return q, kv, page_table, context_lens, dim ** -0.5


def gathered_sdpa(q, kv, page_table, context_lens, scale, compute=torch.float32):
    """Decode attention by gathering each sequence's K/V token by token, then SDPA in
    ``compute`` precision; returned in ``q``'s dtype."""
    page_size, kv_heads = kv.shape[2], kv.shape[3]
    group = q.shape[1] // kv_heads
    outputs = []
    for b, length in enumerate(context_lens.tolist()):
        slots = [int(page_table[b, t // page_size]) * page_size + t % page_size
                 for t in range(length)]
        tokens = kv.to(compute).view(2, -1, kv_heads, kv.shape[4])[:, slots]
        keys, values = (x.transpose(0, 1).repeat_interleave(group, dim=0) for x in tokens)
        query = q[b].to(compute)[:, None, :]
        out = F.scaled_dot_product_attention(query, keys, values, scale=scale)
        outputs.append(out[:, 0])
    return torch.stack(outputs).to(q.dtype)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_decode_numba_matches_reference(heads, kv_heads, dim, page_size):
    case = paged_case(heads, kv_heads, dim, page_size, context_lengths(page_size))
    expected = paged_decode_attention_reference(*case)
    torch.testing.assert_close(paged_decode_attention_numba(*case), expected, **TOLERANCE)
    torch.testing.assert_close(paged_decode_attention(*case), expected, **TOLERANCE)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_decode_reference_matches_sdpa(heads, kv_heads, page_size):
    case = paged_case(heads, kv_heads, 32, page_size, context_lengths(page_size))
    torch.testing.assert_close(paged_decode_attention_reference(*case), gathered_sdpa(*case),
                               **TOLERANCE)


@pytest.mark.parametrize("lens", [[1], [1025], [1, 300, 1023, 1024, 1025, 64]])
def test_decode_long_contexts(lens):
    case = paged_case(8, 2, 64, 16, lens, seed=len(lens))
    expected = gathered_sdpa(*case)
    torch.testing.assert_close(paged_decode_attention_numba(*case), expected, **TOLERANCE)
    torch.testing.assert_close(paged_decode_attention_reference(*case), expected, **TOLERANCE)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_decode_numba_long_ragged_batch(heads, kv_heads, page_size):
    """Lengths around the 64-position summation blocks and far past the prefetch distance,
    in every head layout and page size, with head_dim 128."""
    lens = [700, 63, 64, 65, 129, 1300, page_size * 37 + 1]
    case = paged_case(heads, kv_heads, 128, page_size, lens, seed=page_size)
    torch.testing.assert_close(paged_decode_attention_numba(*case),
                               paged_decode_attention_reference(*case), **TOLERANCE)


def test_decode_numba_group_larger_than_one_call():
    """40 query heads on one kv head: the vector code serves them 16, 16 and 8 at a time."""
    case = paged_case(40, 1, 64, 16, [1, 17, 300], seed=5)
    torch.testing.assert_close(paged_decode_attention_numba(*case),
                               paged_decode_attention_reference(*case), **TOLERANCE)


def test_decode_head_dim_off_the_vector_width_runs_the_reference():
    case = paged_case(8, 2, 24, 4, [1, 9, 37], seed=4)
    torch.testing.assert_close(paged_decode_attention(*case), gathered_sdpa(*case),
                               **TOLERANCE)


def test_decode_numba_rounding_does_not_grow_with_context():
    q, kv, page_table, context_lens, scale = paged_case(4, 2, 64, 16, [16384], seed=3)
    case = (q * 3, kv, page_table, context_lens, scale)  # peaky softmax
    exact = gathered_sdpa(*case, compute=torch.float64)
    torch.testing.assert_close(paged_decode_attention_reference(*case), exact, rtol=0,
                               atol=5e-6)
    # the numba kernel stays within 1e-6 of the output's scale
    torch.testing.assert_close(paged_decode_attention_numba(*case), exact, rtol=0,
                               atol=1e-6 * exact.abs().max().item())


def test_decode_numba_result_does_not_depend_on_batch():
    """Each sequence's output is bit-identical alone, in another batch order, and with its
    K/V on other pages: nothing is reduced across sequences."""
    lens = [37, 1, 300, 64, 129]
    q, kv, page_table, context_lens, scale = paged_case(8, 2, 64, 4, lens, seed=7)
    batched = paged_decode_attention_numba(q, kv, page_table, context_lens, scale)
    for b in range(len(lens)):
        alone = paged_decode_attention_numba(q[b:b + 1], kv, page_table[b:b + 1],
                                             context_lens[b:b + 1], scale)
        assert torch.equal(alone[0], batched[b])
    order = torch.tensor([3, 0, 4, 2, 1])
    reordered = paged_decode_attention_numba(q[order], kv, page_table[order],
                                             context_lens[order], scale)
    assert torch.equal(reordered, batched[order])
    moved_pages = torch.randperm(kv.shape[1], generator=torch.Generator().manual_seed(1))
    moved_kv = torch.empty_like(kv)
    moved_kv[:, moved_pages] = kv
    valid = page_table < kv.shape[1]
    moved_table = torch.where(valid, moved_pages[page_table.clamp(max=kv.shape[1] - 1)],
                              page_table).to(torch.int32)
    moved = paged_decode_attention_numba(q, moved_kv, moved_table, context_lens, scale)
    assert torch.equal(moved, batched)


def test_decode_numba_scores_far_below_the_peak():
    """Scores hundreds below a row's peak, whose exponentials underflow float32."""
    q, kv, page_table, context_lens, scale = paged_case(4, 2, 64, 16, [1, 40, 500], seed=9)
    case = (q * 60, kv, page_table, context_lens, scale)
    exact = gathered_sdpa(*case, compute=torch.float64)
    torch.testing.assert_close(paged_decode_attention_numba(*case), exact, **TOLERANCE)


def test_decode_numba_nan_stays_in_its_sequence_and_kv_head():
    q, kv, page_table, context_lens, scale = paged_case(8, 2, 16, 4, [5, 9], seed=2)
    kv[0, page_table[1, 1], 2, 0, 3] = float("nan")  # key of sequence 1, position 6, kv head 0
    out = paged_decode_attention_numba(q, kv, page_table, context_lens, scale)
    torch.testing.assert_close(
        out, paged_decode_attention_reference(q, kv, page_table, context_lens, scale),
        equal_nan=True, **TOLERANCE)
    assert out[1, :4].isnan().all() and not out[1, 4:].isnan().any()
    assert not out[0].isnan().any()


@numba.njit
def _exp_of(row, count, peak):
    return exp_shifted(row, count, peak)


@numba.njit
def _peak_of(row, count):
    return row_peak(row, count)


def test_exp_within_one_ulp():
    """The kernels' own vectorised expf against float64 exp, over every argument the
    softmax can give it (<= 0), below the smallest normal float32 and at NaN; a length that
    is not a multiple of 16, so the partial last vector is taken too."""
    x = np.concatenate([np.linspace(-88.0, 0.0, 200_001, dtype=np.float32),
                        np.float32([-1e-7, -0.5 * np.log(2.0), 0.5 * np.log(2.0) - 1, -1e30,
                                    -np.inf, np.nan])])
    got = x.copy()
    _exp_of(got, got.size, np.float32(0.0))
    exact = np.exp(x.astype(np.float64))
    normal = exact >= np.finfo(np.float32).tiny
    np.testing.assert_allclose(got[normal], exact[normal], rtol=np.finfo(np.float32).eps,
                               atol=0)
    assert got[0] == 0.0 and got[-3] == 0.0 and got[-2] == 0.0 and np.isnan(got[-1])
    assert (got[~normal & ~np.isnan(x)] == 0.0).all()


@pytest.mark.parametrize("count", [1, 15, 16, 17, 100])
def test_exp_shifted_sum_and_untouched_tail(count):
    """The returned sum is the numerators' sum; elements past `count` are left alone.
    (Expected: exp of each float32 difference ``x - peak``, which the kernel rounds too.)"""
    row = np.random.default_rng(count).standard_normal(count + 5).astype(np.float32)
    expected = np.exp((row[:count] - row[:count].max()).astype(np.float64))
    got = row.copy()
    total = _exp_of(got, count, _peak_of(got, count))
    np.testing.assert_allclose(got[:count], expected, rtol=np.finfo(np.float32).eps)
    np.testing.assert_allclose(total, expected.sum(), rtol=1e-6)
    assert (got[count:] == row[count:]).all()
    assert _peak_of(row, count) == row[:count].max()


HALF_ROUNDING = {torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("heads,kv_heads", HEADS)
def test_decode_numba_half_precision_matches_reference(heads, kv_heads, page_size, dtype):
    """Half-precision KV widened row by row: the float32 sums of the reference, rounded once
    at the end, so at most about one rounding of the dtype apart."""
    lens = [1, 63, 64, 65, 700, page_size * 37 + 1]
    case = paged_case(heads, kv_heads, 64, page_size, lens, dtype=dtype, seed=page_size)
    out = paged_decode_attention(*case)
    assert out.dtype == dtype
    torch.testing.assert_close(paged_decode_attention_numba(*case), out, rtol=0, atol=0)
    torch.testing.assert_close(out, paged_decode_attention_reference(*case),
                               rtol=HALF_ROUNDING[dtype], atol=1e-3)
    torch.testing.assert_close(out, gathered_sdpa(*case), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_numba_half_precision_negative_values(dtype):
    """Negative KV values (16-bit patterns with the top bit set) widen with their sign."""
    case = list(paged_case(4, 2, 16, 4, [9, 3], dtype=dtype))
    case[1] = -case[1].abs() - 1.0
    torch.testing.assert_close(paged_decode_attention_numba(*case),
                               paged_decode_attention_reference(*case),
                               rtol=HALF_ROUNDING[dtype], atol=1e-3)


def test_float16_widening_is_exact_for_every_bit_pattern():
    """All 65536 float16 patterns as value rows weighted by 1: normals, subnormals, zeros and
    infinities come out exactly (a zero's sign aside); NaNs stay NaN."""
    patterns = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    widened = _weighted_by_one(patterns.reshape(-1, 1, 16), block_shape(16, 1))
    exact = patterns.view(np.float16).astype(np.float32)
    nan = np.isnan(exact)
    np.testing.assert_array_equal(widened[~nan], exact[~nan])
    assert np.isnan(widened[nan]).all()


@numba.njit
def _weighted_by_one(page, shape):
    """Each row of ``page[rows, 1, 16]`` through ``block_values`` alone, with weight 1."""
    out = np.empty(page.shape[0] * 16, dtype=np.float32)
    weights, sums = np.ones((1, 1), dtype=np.float32), np.empty((1, 16), dtype=np.float32)
    for row in range(page.shape[0]):
        sums[:] = 0.0
        block_values(weights, 0, 0, page, page, row, 0, 1, sums, shape)
        out[row * 16:(row + 1) * 16] = sums[0]
    return out


def test_decode_accepts_non_contiguous_query():
    q, kv, page_table, context_lens, scale = paged_case(4, 2, 16, 4, [5, 9])
    wide = torch.cat([q, q], dim=2)[:, :, :16]
    torch.testing.assert_close(
        paged_decode_attention_numba(wide, kv, page_table, context_lens, scale),
        paged_decode_attention_reference(q, kv, page_table, context_lens, scale), **TOLERANCE)


def test_decode_numba_rejects_bad_pages():
    q, kv, page_table, context_lens, scale = paged_case(4, 2, 16, 4, [5, 9])
    page_table[1, 0] = kv.shape[1]
    with pytest.raises(IndexError):
        paged_decode_attention_numba(q, kv, page_table, context_lens, scale)
    with pytest.raises(IndexError):
        paged_decode_attention_numba(q, kv, page_table[:, :1], context_lens, scale)


def whole_pages(pages: torch.Tensor, page_size: int) -> torch.Tensor:
    return (pages[:, None] * page_size + torch.arange(page_size)).flatten()


def slot_sets(num_pages: int, page_size: int, seed: int):
    """Two disjoint slot sets of equal size: whole shuffled pages, then two lone slots."""
    gen = torch.Generator().manual_seed(seed)
    pages = torch.randperm(num_pages, generator=gen)
    half = num_pages // 2
    source = torch.cat([whole_pages(pages[:half - 2], page_size),
                        pages[half - 2:half] * page_size + page_size // 2])
    target = torch.cat([whole_pages(pages[half:2 * half - 2], page_size),
                        pages[2 * half - 2:2 * half] * page_size + page_size - 1])
    return source, target


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_pack_unpack_roundtrip(dtype, page_size):
    kv = torch.randn(2, 12, page_size, 2, 16).to(dtype)
    source, target = slot_sets(12, page_size, seed=page_size)
    buf = pack_slots_reference(kv, source)
    assert buf.shape == (2, len(source), 2, 16) and buf.is_contiguous()
    for pack in (pack_slots_numba, pack_slots):
        assert torch.equal(pack(kv, source), buf)
    for unpack in (unpack_slots_reference, unpack_slots_numba, unpack_slots):
        moved = torch.zeros_like(kv)
        unpack(moved, target, buf)
        assert torch.equal(pack_slots_reference(moved, target), buf)
        untouched = torch.ones(moved.view(2, -1, 2, 16).shape[1], dtype=torch.bool)
        untouched[target] = False
        assert not moved.view(2, -1, 2, 16)[:, untouched].any()


def test_pack_no_slots():
    kv = torch.randn(2, 3, 4, 2, 16)
    empty = torch.empty(0, dtype=torch.int64)
    assert pack_slots_numba(kv, empty).shape == (2, 0, 2, 16)
    unpack_slots_numba(kv, empty, pack_slots_numba(kv, empty))


def test_pack_numba_rejects_bad_slots():
    kv = torch.randn(2, 3, 4, 2, 16)
    with pytest.raises(IndexError):
        pack_slots_numba(kv, torch.tensor([10, 11, 12]))
    with pytest.raises(IndexError):
        pack_slots_numba(kv, torch.tensor([-1]))
    with pytest.raises(ValueError):
        unpack_slots_numba(kv, torch.tensor([0, 1]), torch.zeros(2, 3, 2, 16))

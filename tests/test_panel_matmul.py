"""The float32 panel product (kernels/panel_matmul.py) against torch's, and how linear layers
pick it."""

import pytest
import torch
import torch.nn.functional as F

from mpiserve.cpu_features import has_avx512
from mpiserve.kernels import panel_matmul
from mpiserve.model import linear_weight
from mpiserve.model.linear_weight import for_linear, linear


def _weight(out_features, in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * in_features ** -0.5


def _close(got, expected, depth):
    # float32 sums of `depth` products of unit-scale terms, in another order than torch's
    assert got.shape == expected.shape and got.dtype == torch.float32
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6 * depth ** 0.5)


def test_pack_and_unpack_are_inverse():
    w = _weight(128, 40)
    panels = panel_matmul.pack_panels(w)
    assert panels.shape == (2, 40, 64)
    assert torch.equal(panels[1, 7], w[64:, 7])
    assert torch.equal(panel_matmul.unpack_panels(panels), w)


# rows: one, within a 6-row tile, tile edges, past a 96-row block; depths below, at and past
# the 128-step chunk
@pytest.mark.parametrize("rows", [1, 5, 6, 7, 12, 95, 96, 97, 200])
@pytest.mark.parametrize("depth", [1, 16, 128, 200, 576])
def test_kernel_matches_torch(rows, depth):
    w = _weight(192, depth, seed=rows)
    x = torch.randn(rows, depth, generator=torch.Generator().manual_seed(depth))
    panels = panel_matmul.pack_panels(w)
    got = panel_matmul.panel_matmul(x, panels)
    _close(got, F.linear(x, w), depth)
    _close(got, panel_matmul.panel_matmul_reference(x, panels), depth)


def test_a_row_does_not_depend_on_its_batch_mates():
    """Each sum is one chain of multiply-adds in order of k: the same bits for a row alone, in
    a tile, in a later block, and when other rows change."""
    w = _weight(256, 300)
    x = torch.randn(150, 300, generator=torch.Generator().manual_seed(1))
    panels = panel_matmul.pack_panels(w)
    whole = panel_matmul.panel_matmul(x, panels)
    for row in (0, 5, 6, 101, 149):
        alone = panel_matmul.panel_matmul(x[row:row + 1], panels)
        assert torch.equal(alone[0], whole[row])
    other = x.clone()
    other[1:] = -other[1:]
    assert torch.equal(panel_matmul.panel_matmul(other, panels)[0], whole[0])


def test_non_contiguous_input_and_no_rows():
    w = _weight(64, 32)
    panels = panel_matmul.pack_panels(w)
    x = torch.randn(32, 10).t()                       # [10, 32], a transposed view
    _close(panel_matmul.panel_matmul(x, panels), F.linear(x, w), 32)
    assert panel_matmul.panel_matmul(torch.empty(0, 32), panels).shape == (0, 64)


def test_which_weights_are_packed():
    assert panel_matmul.can_pack(torch.zeros(64, 8))
    assert not panel_matmul.can_pack(torch.zeros(96, 8))             # not a multiple of 64
    assert not panel_matmul.can_pack(torch.zeros(64, 8, dtype=torch.bfloat16))
    assert not panel_matmul.can_pack(torch.zeros(64))


def test_linear_layers_hold_float32_panels_on_one_thread_with_avx512_only(monkeypatch):
    monkeypatch.setattr(linear_weight, "_AVX512", True)
    w = _weight(128, 48)
    assert for_linear(w).dim() == 3                                  # the suite runs 1 thread
    assert for_linear(_weight(96, 48)).dim() != 3
    monkeypatch.setattr(linear_weight, "_AVX512", False)             # an AVX2-only CPU
    assert for_linear(w).dim() != 3
    monkeypatch.setattr(linear_weight, "_AVX512", True)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert for_linear(w).dim() != 3


def test_panels_are_chosen_by_the_cpu_flags():
    assert has_avx512("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\n")
    assert not has_avx512("processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n")
    assert not has_avx512("processor\t: 0\n")
    assert linear_weight._AVX512 == has_avx512()


def test_linear_with_panels_keeps_leading_dims_bias_and_dtype(monkeypatch):
    monkeypatch.setattr(linear_weight, "_AVX512", True)
    w, bias = _weight(128, 48), torch.randn(128)
    packed = for_linear(w)
    x = torch.randn(2, 3, 48)
    _close(linear(x, packed, bias), F.linear(x, w, bias), 48)
    half = linear(x.bfloat16(), packed)                   # a half-precision model's widened weight
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), F.linear(x.bfloat16().float(), w), rtol=2 ** -7,
                          atol=1e-2)

"""kernels.fused_rows: the one-pass residual + RMS norm and rotary kernels against torch's
operators (the references the model uses for rows the kernels do not take, and for a float32
norm)."""

from __future__ import annotations

import pytest
import torch

from mpiserve.kernels import fused_rows
from mpiserve.model.rope import rotate
from mpiserve.model.transformer import residual_rms_norm, rms_norm

HALF = [torch.bfloat16, torch.float16]


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of the half type lie between a and b (same signs)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def rows(count: int, width: int, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(count, width, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("width", [16, 576, 2048])
def test_residual_norm_matches_torch(dtype, width):
    x, delta = rows(33, width, dtype, 1), rows(33, width, dtype, 2, scale=3.0)
    weight = rows(1, width, dtype, 3)[0].abs() + 0.5
    normed, stream = fused_rows.rms_norm(x, weight, 1e-5, delta)
    assert torch.equal(stream, x + delta)                  # the residual sum: bit-identical
    expected = rms_norm(x + delta, weight, 1e-5)
    apart = ulps_apart(normed, expected)
    # only the order of the float32 sum of squares differs: the normed value may round the
    # other way, in rare elements, and the weight's product of it once more
    assert apart.max() <= 2
    assert (apart > 0).float().mean() < 1e-3
    plain, same = fused_rows.rms_norm(x, weight, 1e-5)
    assert same is x
    assert ulps_apart(plain, rms_norm(x, weight, 1e-5)).max() <= 2


@pytest.mark.parametrize("dtype", HALF)
def test_norm_rounds_specials_as_torch(dtype):
    """NaN and infinity end where torch's do (a NaN makes its whole row NaN, an infinity its
    own element, the rest of its row 0); a residual sum past the type's largest value rounds
    to infinity, as torch's."""
    width = 32
    biggest = torch.finfo(dtype).max
    x = torch.ones(3, width, dtype=dtype)
    delta = torch.zeros(3, width, dtype=dtype)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    x[2, :] = biggest
    delta[2, :] = biggest
    weight = torch.ones(width, dtype=dtype)
    normed, stream = fused_rows.rms_norm(x, weight, 1e-6, delta)
    expected_stream = x + delta
    assert torch.equal(stream.isnan(), expected_stream.isnan())
    assert torch.equal(stream.nan_to_num(0.0), expected_stream.nan_to_num(0.0))
    expected = rms_norm(expected_stream, weight, 1e-6)
    assert torch.equal(normed.isnan(), expected.isnan())
    assert torch.equal(normed.nan_to_num(0.0), expected.nan_to_num(0.0))
    assert normed[0].isnan().all() and normed[1].isnan().sum() == 1


@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_rotation_in_place_is_bit_identical(dtype, head_dim):
    tokens, heads, kv_heads = 19, 6, 2
    qkv = rows(tokens, (heads + 2 * kv_heads) * head_dim, dtype, 4, scale=10.0)
    angles = rows(tokens, head_dim, torch.float32, 5, scale=100.0)
    cos, sin = angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]
    qk = qkv[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    expected = rotate(qk.clone(), cos, sin)
    values = qkv[:, (heads + kv_heads) * head_dim:].clone()
    result = rotate(qk, cos, sin, overwrite=True)
    assert result.data_ptr() == qk.data_ptr()               # it ran in place: the kernel
    assert torch.equal(result, expected)
    assert torch.equal(qkv[:, (heads + kv_heads) * head_dim:], values)   # V untouched


def test_rows_the_kernels_do_not_take_keep_torch():
    """A float32 norm, and widths off the vector length, run torch's operators unchanged."""
    for dtype, width in [(torch.float32, 64), (torch.bfloat16, 24)]:
        x, delta = rows(5, width, dtype, 6), rows(5, width, dtype, 7)
        weight = torch.ones(width, dtype=dtype)
        assert not fused_rows.eligible(x, weight)
        normed, stream = residual_rms_norm(x, delta, weight, 1e-5)
        assert torch.equal(stream, x + delta)
        assert torch.equal(normed, rms_norm(x + delta, weight, 1e-5))
    qk = rows(4, 3 * 48, torch.bfloat16, 8).view(4, 3, 48)    # half of 48 is off 16 lanes
    cos = torch.ones(4, 1, 48, dtype=torch.bfloat16)
    out = rotate(qk, cos, cos, overwrite=True)
    assert out.data_ptr() != qk.data_ptr()
    assert torch.equal(out, rotate(qk, cos, cos))

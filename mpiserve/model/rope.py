"""Rotary position embeddings, including Llama 3.x frequency scaling."""

from __future__ import annotations

import math

import torch

from mpiserve.kernels import fused_rows

from .model_config import ModelConfig


def inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    if config.rope_scaling is not None:
        inv_freq = _llama3_scaled(inv_freq, config.rope_scaling)
    return inv_freq


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryTable:
    """cos/sin for every position up to `max_positions`, looked up per token; computed on the
    CPU, kept on `device` (where the positions it is looked up with live)."""

    def __init__(self, config: ModelConfig, max_positions: int,
                 device: torch.device | str = "cpu"):
        inv_freq = inverse_frequencies(config)
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]         # [P, D/2]
        angles = torch.cat((freqs, freqs), dim=-1)              # [P, D]
        self.cos, self.sin = angles.cos().to(device), angles.sin().to(device)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin for tokens at `positions` ([T]), shaped [T, 1, D] to broadcast over heads."""
        return self.cos[positions].to(dtype)[:, None, :], self.sin[positions].to(dtype)[:, None, :]


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           overwrite: bool = False) -> torch.Tensor:
    """x: [T, heads, D] rotated by the angles whose cos/sin `RotaryTable.lookup` gave. With
    `overwrite`, CPU heads (float32 or half precision) that lie side by side in each row are
    rotated in place by `kernels.fused_rows` (bit-identical to the operators below) and `x` is
    returned."""
    if overwrite and _rotates_in_place(x, cos):
        rows = x.as_strided((x.shape[0], x.shape[1] * x.shape[2]), (x.stride(0), 1))
        fused_rows.rotate_heads_(rows, x.shape[1], cos[:, 0], sin[:, 0])
        return x
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def _rotates_in_place(x: torch.Tensor, cos: torch.Tensor) -> bool:
    return (x.dim() == 3 and x.stride(1) == x.shape[2]
            and fused_rows.eligible(x, cos, multiple=2 * fused_rows.LANES,
                                   dtypes=(*fused_rows.HALF, torch.float32)))

"""Analytic step and KV-transfer times from a model's config.json and a hardware spec: a
roofline per engine step (pure).

A step of T tokens (prefill positions plus decode sequences) on an engine of `tp` devices:

    compute = (2 T W_linear / peak(dtype) + (2 S h V + 4 A n_heads d_head L) / peak(bf16))
              / (tp * compute_efficiency)
    memory  = (W_bytes + (C + T) kv_bytes_per_token) / (tp * hbm_bandwidth * memory_efficiency)
    step    = overhead + max(compute, memory) + 2 L allreduce(T h 2 bytes)

W_linear: the attention and MLP weights (q, k, v, o, gate, up, down) of all L layers; S rows
sampled through the lm_head (h x V, kept in bf16); A (query, key) pairs of attention; C KV
positions read. A ring all-reduce of B bytes over tp devices takes
2 (tp - 1) (latency + B / (tp bandwidth)). A KV transfer of B bytes takes
latency + B / (bandwidth * min(tp_sender, tp_receiver)): each rank of the smaller group moves
its heads' share over its own link.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from ..engine.step_shape import StepShape
from ..errors import MpiserveError
from ..model.model_config import ModelConfig
from .hardware import HardwareSpec

WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
ACTIVATION_BYTES = 2                   # bf16 activations in the TP all-reduce
LM_HEAD_BYTES = 2
MEMORY_FRACTION = 0.9                  # of device memory for weights + KV pages


@dataclass(frozen=True)
class RooflineCost:
    model: ModelConfig
    hardware: HardwareSpec
    dtype: str = "bf16"                 # of the linear layers' weights and math

    def __post_init__(self):
        if self.dtype not in WEIGHT_BYTES:
            raise MpiserveError(f"--dtype {self.dtype}: use {' or '.join(WEIGHT_BYTES)}")

    # cached: step_time reads them every simulated step
    @cached_property
    def linear_params(self) -> int:
        m = self.model
        attention = m.hidden_size * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
        mlp = 3 * m.hidden_size * m.intermediate_size
        return m.num_layers * (attention + mlp)

    @cached_property
    def lm_head_params(self) -> int:
        return self.model.hidden_size * self.model.vocab_size

    @cached_property
    def weight_bytes(self) -> int:
        """Weights one step reads, over the whole engine (the embedding lookup reads rows)."""
        return (self.linear_params * WEIGHT_BYTES[self.dtype]
                + self.lm_head_params * LM_HEAD_BYTES)

    @cached_property
    def kv_bytes_per_token(self) -> int:
        return self.model.kv_bytes_per_token

    @cached_property
    def _seconds_per(self) -> tuple[float, ...]:
        """Per device: compute seconds per token, per sampled row and per attention pair;
        memory seconds for the weights and per KV position."""
        m, hw = self.model, self.hardware
        flops, bf16 = hw.flops(self.dtype) * hw.compute_efficiency, (
            hw.bf16_flops * hw.compute_efficiency)
        bandwidth = hw.hbm_bytes_per_s * hw.memory_efficiency
        return (2 * self.linear_params / flops, 2 * self.lm_head_params / bf16,
                4 * m.num_heads * m.head_dim * m.num_layers / bf16,
                self.weight_bytes / bandwidth, self.kv_bytes_per_token / bandwidth)

    def compute_s(self, shape: StepShape, tp: int) -> float:
        token, sampled, pair, _, _ = self._seconds_per
        return (shape.tokens * token + shape.sampled * sampled
                + shape.attention_pairs * pair) / tp

    def memory_s(self, shape: StepShape, tp: int) -> float:
        _, _, _, weights, kv = self._seconds_per
        return (weights + (shape.context_tokens + shape.tokens) * kv) / tp

    def allreduce_s(self, shape: StepShape, tp: int) -> float:
        if tp <= 1:
            return 0.0
        hw = self.hardware
        message = shape.tokens * self.model.hidden_size * ACTIVATION_BYTES
        one = 2 * (tp - 1) * (hw.allreduce_latency_s
                              + message / (tp * hw.allreduce_bytes_per_s))
        return 2 * self.model.num_layers * one

    def step_time(self, shape: StepShape, tp: int = 1) -> float:
        if shape.tokens == 0:
            return 0.0
        return (self.hardware.step_overhead_s
                + max(self.compute_s(shape, tp), self.memory_s(shape, tp))
                + self.allreduce_s(shape, tp))

    def co_run_slowdown(self, shape: StepShape) -> float:
        """No slowdown: each engine's devices are its own, whatever else runs on the host."""
        return 0.0

    def kv_transfer_time(self, nbytes: int, sender_tp: int = 1, receiver_tp: int = 1) -> float:
        hw = self.hardware
        return hw.kv_latency_s + nbytes / (hw.kv_bytes_per_s * min(sender_tp, receiver_tp))

    def num_pages(self, page_size: int, tp: int = 1) -> int:
        """KV pages that fit next to the weights in MEMORY_FRACTION of the engine's memory."""
        free = MEMORY_FRACTION * self.hardware.hbm_bytes * tp - self.weight_bytes
        pages = int(free // (self.kv_bytes_per_token * page_size))
        if pages < 1:
            raise MpiserveError(f"the model's weights ({self.weight_bytes / 1e9:.1f} GB) leave "
                                f"no room for KV pages on {tp} x {self.hardware.name}; "
                                "raise --tp")
        return pages

    def describe(self) -> str:
        return f"roofline: {self.hardware.name}, {self.dtype} weights"

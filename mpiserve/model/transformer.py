"""The decoder-only transformer (Llama, Mistral, Qwen2, Qwen3) over a flat batch of tokens.

Tokens of all sequences in a step are concatenated: `[T, hidden]`. Linear layers run on the
flat batch; attention reads each sequence's context from the paged KV cache. Decode tokens
(one per sequence) come first in the batch and use the paged decode kernel; prefill chunks
follow, each attending causally to its whole context (`kernels.prefill_attention`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mpiserve import cpu_features
from mpiserve.kernels import fused_rows, paged_decode_attention, prefill_attention

from .linear_weight import for_linear, linear
from .model_config import ModelConfig
from .rope import RotaryTable, rotate
from .tensor_parallel import TensorParallel


@dataclass
class PrefillSpan:
    row: int                        # first row of the chunk in the flat batch
    length: int                     # query tokens in the chunk
    context_slots: torch.Tensor     # [ctx] KV slots of positions 0..ctx-1 (ctx >= length)

    def to(self, device) -> PrefillSpan:
        return PrefillSpan(self.row, self.length, self.context_slots.to(device))


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor         # [T] int64
    positions: torch.Tensor         # [T] int64
    slots: torch.Tensor             # [T] int64, where each token's K and V are written
    num_decode: int                 # rows [0, num_decode) are single decode tokens
    page_table: torch.Tensor        # [num_decode, max_pages] int32
    context_lens: torch.Tensor      # [num_decode] int32
    prefills: list[PrefillSpan] = field(default_factory=list)
    logit_rows: torch.Tensor | None = None   # [S] rows whose next-token logits are wanted

    def to(self, device) -> ForwardBatch:
        """The same batch with every tensor on `device` (to send it to another rank)."""
        def move(t):
            return None if t is None else t.to(device)
        return ForwardBatch(move(self.input_ids), move(self.positions), move(self.slots),
                            self.num_decode, move(self.page_table), move(self.context_lens),
                            [span.to(device) for span in self.prefills], move(self.logit_rows))


@dataclass
class _Layer:
    input_norm: torch.Tensor
    qkv: torch.Tensor               # fused [(H + 2 KVH) * D, hidden]
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor           # fused [2 * intermediate, hidden]
    down: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def residual_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(`rms_norm(s)`, `s`) for the residual stream `s = x + delta` (`x` when `delta` is None).
    Half-precision CPU rows take the one-pass kernel of `kernels.fused_rows`; float32 keeps
    transformers' operators (and so its roundings)."""
    if x.dim() == 2 and fused_rows.eligible(x, weight, *(() if delta is None else (delta,))):
        return fused_rows.rms_norm(x, weight, eps, delta)
    if delta is not None:
        x = x + delta
    return rms_norm(x, weight, eps), x


class Transformer:
    """`weights` are this rank's slices when `tp` spans several ranks (see `TensorShard`);
    `config` is the whole model's."""

    def __init__(self, config: ModelConfig, weights: dict[str, torch.Tensor], max_positions: int,
                 matmul_dtype: torch.dtype | None = None, tp: TensorParallel | None = None):
        self.tp = tp or TensorParallel.single()
        self.full_config = config
        self.config = self.tp.shard.local_config(config)
        self.scale = config.head_dim ** -0.5
        self.matmul_dtype = matmul_dtype or weights["model.embed_tokens.weight"].dtype
        self.half_prefill_by_sdpa = cpu_features.has_matrix_units(
            str(self.matmul_dtype).removeprefix("torch."))
        self.embed = weights["model.embed_tokens.weight"]
        lm_head = weights.get("lm_head.weight", self.embed) \
            if config.tie_word_embeddings else weights["lm_head.weight"]
        self.lm_head = self._for_matmul(lm_head)
        self.norm = weights["model.norm.weight"]
        self.layers = [self._layer(weights, i) for i in range(config.num_layers)]
        self.rotary = RotaryTable(config, max_positions, self.embed.device)

    def _layer(self, w: dict[str, torch.Tensor], i: int) -> _Layer:
        p = f"model.layers.{i}."
        attn = p + "self_attn."
        bias = None
        if self.config.attention_bias:
            bias = torch.cat([w[f"{attn}{n}_proj.bias"] for n in "qkv"]).to(self.matmul_dtype)
        matmul = self._for_matmul
        return _Layer(
            input_norm=w[p + "input_layernorm.weight"],
            qkv=matmul(torch.cat([w[f"{attn}{n}_proj.weight"] for n in "qkv"])),
            qkv_bias=bias,
            q_norm=w.get(attn + "q_norm.weight") if self.config.qk_norm else None,
            k_norm=w.get(attn + "k_norm.weight") if self.config.qk_norm else None,
            o=matmul(w[attn + "o_proj.weight"]),
            post_norm=w[p + "post_attention_layernorm.weight"],
            gate_up=matmul(torch.cat([w[p + "mlp.gate_proj.weight"],
                                      w[p + "mlp.up_proj.weight"]])),
            down=matmul(w[p + "mlp.down_proj.weight"]),
        )

    def _for_matmul(self, weight: torch.Tensor) -> torch.Tensor:
        return for_linear(weight.to(self.matmul_dtype))

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights this rank holds (a tied LM head counted once)."""
        tensors = {id(t): t for t in (self.embed, self.norm, self.lm_head)}
        for layer in self.layers:
            tensors.update((id(t), t) for t in vars(layer).values() if isinstance(t, torch.Tensor))
        return sum(t.numel() * t.element_size() for t in tensors.values())

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, kv_layers: list[torch.Tensor],
                after_layer: Callable[[int], None] | None = None) -> torch.Tensor:
        """Writes the batch's K/V into `kv_layers`; returns float32 logits [S, vocab]."""
        x = self.tp.embed(batch.input_ids, self.embed, self.full_config)   # [T, hidden]
        angles = self.rotary.lookup(batch.positions, x.dtype)
        eps = self.config.rms_norm_eps
        delta = None            # the last sublayer's output, not yet added to the stream x
        for index, layer in enumerate(self.layers):
            h, x = residual_rms_norm(x, delta, layer.input_norm, eps)
            delta = self._attention(layer, h, batch, kv_layers[index], angles)
            h, x = residual_rms_norm(x, delta, layer.post_norm, eps)
            delta = self._mlp(layer, h)
            if after_layer is not None:
                after_layer(index)
        rows = batch.logit_rows
        if rows is not None:
            x, delta = x[rows], delta[rows]
        h, _ = residual_rms_norm(x, delta, self.norm, eps)
        logits = linear(h, self.lm_head)
        return self.tp.gather_logits(logits, self.full_config).float()

    def _mlp(self, layer: _Layer, x: torch.Tensor) -> torch.Tensor:
        gate, up = linear(x, layer.gate_up).chunk(2, dim=-1)
        return self.tp.sum_partials(linear(F.silu(gate) * up, layer.down))

    def _attention(self, layer: _Layer, x: torch.Tensor, batch: ForwardBatch,
                   kv: torch.Tensor, angles) -> torch.Tensor:
        c = self.config
        heads, kv_heads, dim = c.num_heads, c.num_kv_heads, c.head_dim
        qkv = linear(x, layer.qkv, layer.qkv_bias)
        qk, v = qkv.split([(heads + kv_heads) * dim, kv_heads * dim], dim=-1)
        qk, v = qk.view(-1, heads + kv_heads, dim), v.view(-1, kv_heads, dim)
        if layer.q_norm is None:        # queries and keys rotate as one tensor: half the ops
            q, k = rotate(qk, *angles, overwrite=True).split([heads, kv_heads], dim=1)
        else:
            q, k = qk.split([heads, kv_heads], dim=1)
            q = rotate(rms_norm(q, layer.q_norm, c.rms_norm_eps), *angles, overwrite=True)
            k = rotate(rms_norm(k, layer.k_norm, c.rms_norm_eps), *angles, overwrite=True)
        flat = kv.view(2, -1, kv_heads, dim)                     # [2, slots, KVH, D]
        flat[0].index_copy_(0, batch.slots, k)
        flat[1].index_copy_(0, batch.slots, v)
        out = self._decode_attention(q, kv, batch)               # [T, H, D]
        for span in batch.prefills:
            out[span.row:span.row + span.length] = self._prefill_attention(q, flat, span)
        return self.tp.sum_partials(linear(out.reshape(-1, heads * dim), layer.o))

    def _decode_attention(self, q, kv, batch: ForwardBatch) -> torch.Tensor:
        """The attention output of every row, with the decode rows filled in (the whole of
        it when the batch is all decode rows); the prefill rows are left to the caller."""
        n = batch.num_decode
        if n == 0:
            return torch.empty_like(q)
        decoded = paged_decode_attention(q[:n], kv, batch.page_table, batch.context_lens,
                                         self.scale)
        if n == q.shape[0]:
            return decoded
        out = torch.empty_like(q)
        out[:n] = decoded
        return out

    def _prefill_attention(self, q, flat, span: PrefillSpan) -> torch.Tensor:
        """The chunk's rows of `q` over its context, read from the cache (written already)."""
        rows = q[span.row:span.row + span.length]
        return prefill_attention(rows, flat[0], flat[1], span.context_slots, self.scale,
                                 self.half_prefill_by_sdpa)

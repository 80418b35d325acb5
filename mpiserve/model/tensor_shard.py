"""Which slice of each weight one rank of a tensor-parallel group holds (pure logic).

Megatron-style: q/k/v and gate/up are split by output rows (column-parallel), o and down by
input columns (row-parallel, their partial products summed over the group). Attention heads
split in contiguous ranges; when the group is larger than the number of KV heads, each KV
head is held by `size / num_kv_heads` consecutive ranks, whose query heads all read it.
The embedding and the LM head (one tensor when tied) split by vocabulary rows: they are a
fifth of a small model's weights, so replicating them would keep a rank's share well above
1/size; a lookup costs one all-reduce of the hidden states and the head one all-gather of
the logits.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .model_config import ModelConfig

Range = tuple[int, int]


def even_split(total: int, parts: int, index: int) -> Range:
    """The `index`-th of `parts` contiguous ranges covering [0, total), sizes differing by <= 1
    (the first ranges take the remainder)."""
    base, extra = divmod(total, parts)
    begin = index * base + min(index, extra)
    return begin, begin + base + (index < extra)


@dataclass(frozen=True)
class TensorShard:
    size: int = 1          # ranks in the group
    rank: int = 0          # this rank's place in the group, 0 = lead

    def problem(self, config: ModelConfig) -> str | None:
        """Why `config` cannot be split over this group, or None."""
        n, c = self.size, config
        if n == 1:
            return None
        if c.num_heads % n:
            return f"{c.num_heads} attention heads do not divide by tensor-parallel size {n}"
        if c.num_kv_heads % n and n % c.num_kv_heads:
            return (f"{c.num_kv_heads} KV heads neither divide by tensor-parallel size {n} nor "
                    f"divide it (each rank needs whole KV heads)")
        if c.intermediate_size % n:
            return (f"MLP width {c.intermediate_size} does not divide by tensor-parallel "
                    f"size {n}")
        return None

    def heads(self, config: ModelConfig) -> Range:
        per = config.num_heads // self.size
        return self.rank * per, (self.rank + 1) * per

    def kv_heads(self, config: ModelConfig) -> Range:
        return self.kv_head_range(config.num_kv_heads)

    def kv_head_range(self, num_kv_heads: int) -> Range:
        if self.size <= num_kv_heads:
            per = num_kv_heads // self.size
            return self.rank * per, (self.rank + 1) * per
        head = self.rank // (self.size // num_kv_heads)
        return head, head + 1

    def inner(self, config: ModelConfig) -> Range:
        per = config.intermediate_size // self.size
        return self.rank * per, (self.rank + 1) * per

    def vocab(self, config: ModelConfig) -> Range:
        return even_split(config.vocab_size, self.size, self.rank)

    def local_config(self, config: ModelConfig) -> ModelConfig:
        """The config of this rank's part: its heads, KV heads and MLP width (vocabulary and
        hidden size stay global)."""
        if self.size == 1:
            return config
        (h0, h1), (k0, k1), (i0, i1) = self.heads(config), self.kv_heads(config), \
            self.inner(config)
        return replace(config, num_heads=h1 - h0, num_kv_heads=k1 - k0,
                       intermediate_size=i1 - i0)

    def rows_and_columns(self, name: str, config: ModelConfig) -> tuple[Range | None, Range | None]:
        """The (row range, column range) of the Hugging Face tensor `name` this rank holds;
        None for a dimension it holds whole."""
        if self.size == 1:
            return None, None
        d = config.head_dim
        heads, kv = self.heads(config), self.kv_heads(config)
        by_suffix = {
            "q_proj": ((heads[0] * d, heads[1] * d), None),
            "k_proj": ((kv[0] * d, kv[1] * d), None),
            "v_proj": ((kv[0] * d, kv[1] * d), None),
            "o_proj": (None, (heads[0] * d, heads[1] * d)),
            "gate_proj": (self.inner(config), None),
            "up_proj": (self.inner(config), None),
            "down_proj": (None, self.inner(config)),
            "embed_tokens": (self.vocab(config), None),
            "lm_head": (self.vocab(config), None),
        }
        parts = name.split(".")
        module = parts[-2] if len(parts) >= 2 else ""
        return by_suffix.get(module, (None, None))


WHOLE = TensorShard()      # one rank holds every tensor whole

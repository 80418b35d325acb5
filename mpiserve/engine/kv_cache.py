"""KV storage: one tensor per layer, `[2, num_pages, page_size, kv_heads, head_dim]`."""

from __future__ import annotations

import torch

from mpiserve.kernels import pack_slots, unpack_slots

from ..model.model_config import ModelConfig


def slot_indices(page_ids: list[int], page_size: int, begin: int, end: int) -> list[int]:
    """Flat slot index of each position in [begin, end) of a sequence holding `page_ids`
    (pure Python: a step builds these for every row, and small tensor ops cost more)."""
    slots = []
    position = begin
    while position < end:
        page, offset = divmod(position, page_size)
        stop = min(end, (page + 1) * page_size)
        first = page_ids[page] * page_size + offset
        slots.extend(range(first, first + stop - position))
        position = stop
    return slots


def pages_for_budget(config: ModelConfig, page_size: int, budget_bytes: int) -> int:
    return max(1, budget_bytes // (config.kv_bytes_per_token * page_size))


class KVCache:
    """The page pool's K/V, one tensor per layer. Written with zeros at start: the memory is
    claimed (and a host short of it fails) before the first request, and no request pays for
    faulting in pages its K/V lands on."""

    def __init__(self, config: ModelConfig, num_pages: int, page_size: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.num_pages, self.page_size = num_pages, page_size
        shape = (2, num_pages, page_size, config.num_kv_heads, config.head_dim)
        self.layers = [torch.zeros(shape, dtype=dtype, device=device)
                       for _ in range(config.num_layers)]

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def slots(self, page_ids: list[int], begin: int, end: int) -> torch.Tensor:
        """Flat slot index of each position in [begin, end) of a sequence with these pages."""
        return torch.tensor(slot_indices(page_ids, self.page_size, begin, end),
                            dtype=torch.int64).to(self.layers[0].device)

    def read(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """K and V of `slots` in one layer as a contiguous `[2, n, kv_heads, head_dim]` buffer."""
        return pack_slots(self.layers[layer], slots)

    def write(self, layer: int, slots: torch.Tensor, buffer: torch.Tensor) -> None:
        unpack_slots(self.layers[layer], slots, buffer)

    def layer_bytes(self, num_tokens: int) -> int:
        one = self.layers[0]
        return 2 * num_tokens * one.shape[3] * one.shape[4] * one.element_size()

"""The collectives of a tensor-parallel forward pass, over one torch.distributed group.

A group of one rank needs none: `TensorParallel.single()` makes every method a no-op, so the
transformer has one code path.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from .model_config import ModelConfig
from .tensor_shard import TensorShard, even_split


class TensorParallel:
    def __init__(self, shard: TensorShard, group=None):
        self.shard = shard
        self.group = group            # torch.distributed process group of the engine's ranks
        self.collective_s = 0.0       # time spent in all-reduce and all-gather (incl. waiting)

    @classmethod
    def single(cls) -> TensorParallel:
        return cls(TensorShard())

    @property
    def size(self) -> int:
        return self.shard.size

    def sum_partials(self, x: torch.Tensor) -> torch.Tensor:
        """Sum a row-parallel layer's partial outputs over the group (in float32 for half
        precision), in place where it can."""
        if self.size == 1:
            return x
        wide = x.float() if x.dtype != torch.float32 else x
        started = time.perf_counter()
        dist.all_reduce(wide, group=self.group)
        self.collective_s += time.perf_counter() - started
        return wide.to(x.dtype)

    def embed(self, ids: torch.Tensor, table: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """Embedding rows of `ids` from a table split by vocabulary: each rank looks up the ids
        in its range, zeros the rest, and the sum over the group is exact."""
        if self.size == 1:
            return F.embedding(ids, table)
        begin, end = self.shard.vocab(config)
        outside = (ids < begin) | (ids >= end)
        rows = F.embedding((ids - begin).masked_fill(outside, 0), table)
        rows.masked_fill_(outside[:, None], 0)
        return self.sum_partials(rows)

    def gather_logits(self, local: torch.Tensor, config: ModelConfig) -> torch.Tensor:
        """[S, vocab] logits from each rank's [S, its vocabulary range] (exact)."""
        if self.size == 1:
            return local
        widest = even_split(config.vocab_size, self.size, 0)
        width = widest[1] - widest[0]
        padded = F.pad(local, (0, width - local.shape[1]))
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        started = time.perf_counter()
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        self.collective_s += time.perf_counter() - started
        sizes = [e - b for b, e in (even_split(config.vocab_size, self.size, r)
                                    for r in range(self.size))]
        return torch.cat([part[:, :n] for part, n in zip(parts, sizes)], dim=1)

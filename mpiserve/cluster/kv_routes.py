"""Which KV heads go from which rank of a sending engine to which rank of a receiving one,
when either is tensor-parallel (pure logic).

Each receiving rank gets every KV head it holds from exactly one sending rank: a head that
several sending ranks replicate is sent by the first of them. Every (sender, receiver) pair
exchanges one contiguous head range, so each pair's sends and receives stay in the order the
announcement gives, as with one-rank engines; no head passes through a third rank.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model.tensor_shard import TensorShard


@dataclass(frozen=True)
class KVRoute:
    sender: int                 # rank index in the sending group (0 = its lead)
    receiver: int               # rank index in the receiving group
    heads: tuple[int, int]      # KV heads [first, last) of the whole model

    def local(self, held: tuple[int, int]) -> slice:
        """These heads within a rank's cache that holds heads `held`."""
        return slice(self.heads[0] - held[0], self.heads[1] - held[0])


def owned_heads(num_kv_heads: int, size: int, index: int) -> tuple[int, int]:
    """The KV heads rank `index` of a group of `size` sends: all it holds, unless another rank
    before it holds the same (replicated) head."""
    first, last = TensorShard(size, index).kv_head_range(num_kv_heads)
    holders = max(1, size // num_kv_heads)
    return (first, last) if index % holders == 0 else (first, first)


def kv_routes(num_kv_heads: int, sender_size: int, receiver_size: int) -> list[KVRoute]:
    """Every route, ordered by receiver then sender (a receiver's routes tile its heads)."""
    routes = []
    for receiver in range(receiver_size):
        want = TensorShard(receiver_size, receiver).kv_head_range(num_kv_heads)
        for sender in range(sender_size):
            have = owned_heads(num_kv_heads, sender_size, sender)
            first, last = max(want[0], have[0]), min(want[1], have[1])
            if first < last:
                routes.append(KVRoute(sender, receiver, (first, last)))
    return routes

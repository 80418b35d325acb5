"""The router's estimate of which prompt prefixes each engine holds (pure bookkeeping).

It mirrors the engines' page hashing: a prefix counts in whole pages. It is an estimate (an
engine may have evicted pages since); `prep_recv` reports what the engine really holds.
"""

from __future__ import annotations

from collections import OrderedDict

from ..engine.page_pool import ROOT_HASH, chain_hash


class PrefixIndex:
    def __init__(self, page_size: int, capacity: int = 200_000):
        self.page_size = page_size
        self.capacity = capacity
        self._held: dict[int, OrderedDict[int, None]] = {}

    def _hashes(self, tokens: list[int], end: int):
        parent = ROOT_HASH
        for start in range(0, end - self.page_size + 1, self.page_size):
            parent = chain_hash(parent, tokens[start:start + self.page_size])
            yield parent

    def add(self, rank: int, tokens: list[int], end: int | None = None) -> None:
        held = self._held.setdefault(rank, OrderedDict())
        for h in self._hashes(tokens, len(tokens) if end is None else end):
            held[h] = None
            held.move_to_end(h)
        while len(held) > self.capacity:
            held.popitem(last=False)

    def matched(self, rank: int, tokens: list[int]) -> int:
        """Tokens of the longest page-aligned prefix of `tokens` the engine likely holds."""
        held = self._held.get(rank, {})
        count = 0
        for h in self._hashes(tokens, len(tokens)):
            if h not in held:
                break
            count += self.page_size
        return count

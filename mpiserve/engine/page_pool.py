"""Page allocation with reference counts and an automatic prefix cache (pure bookkeeping).

A page holds the KV of `page_size` consecutive positions of one sequence. A page that is full
and computed can be registered under the chained hash of all tokens up to its end; once no
sequence references it, it stays in an LRU of cached pages and can be revived by a later
request with the same prefix, until allocation needs it back.
"""

from __future__ import annotations

from collections import OrderedDict

from ..errors import CapacityError

ROOT_HASH = 0


def chain_hash(parent: int, tokens) -> int:
    """Hash of a full page's tokens chained with the hash of everything before it."""
    return hash((parent, tuple(tokens)))


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"need num_pages >= 1 and page_size >= 1, "
                             f"got {num_pages}, {page_size}")
        self.num_pages = num_pages
        self.page_size = page_size
        self._free = list(range(num_pages - 1, -1, -1))     # stack; pops page 0 first
        # unreferenced pages that keep a hash, least recently used first
        self._cached: OrderedDict[int, None] = OrderedDict()
        self._refs = [0] * num_pages
        self._hash_of: dict[int, int] = {}                   # page -> hash
        self._tokens_of: dict[int, tuple[int, ...]] = {}     # page -> tokens (collision check)
        self._page_of: dict[int, int] = {}                   # hash -> page
        self.lookups = 0
        self.hit_tokens = 0
        self.queried_tokens = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_available(self) -> int:
        """Pages an allocation can take now (free plus evictable cached)."""
        return len(self._free) + len(self._cached)

    @property
    def num_used(self) -> int:
        return self.num_pages - self.num_available

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def match_prefix(self, tokens, limit: int | None = None) -> tuple[list[int], list[int]]:
        """Pages and chained hashes of the longest cached full-page prefix of tokens[:limit]."""
        limit = len(tokens) if limit is None else limit
        pages, hashes, parent = [], [], ROOT_HASH
        for start in range(0, limit - self.page_size + 1, self.page_size):
            chunk = tuple(tokens[start:start + self.page_size])
            h = chain_hash(parent, chunk)
            page = self._page_of.get(h)
            if page is None or self._tokens_of[page] != chunk:
                break
            pages.append(page)
            hashes.append(h)
            parent = h
        self.lookups += 1
        self.queried_tokens += limit
        self.hit_tokens += len(pages) * self.page_size
        return pages, hashes

    # ---- reference counting ------------------------------------------------------------------
    def acquire(self, pages: list[int]) -> None:
        for page in pages:
            if self._refs[page] == 0:
                self._cached.pop(page, None)
            self._refs[page] += 1

    def allocate(self, count: int) -> list[int]:
        """Take `count` fresh pages, evicting least recently used cached pages if needed."""
        if count > self.num_available:
            raise CapacityError(f"asked for {count} KV pages, {self.num_available} available")
        pages = []
        for _ in range(count):
            page = self._free.pop() if self._free else self._evict()
            self._refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages: list[int]) -> None:
        for page in pages:
            self._refs[page] -= 1
            if self._refs[page] < 0:
                raise AssertionError(f"page {page} released more often than acquired")
            if self._refs[page] == 0:
                if page in self._hash_of:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    def register(self, page: int, parent: int, tokens) -> int:
        """Publish a full, computed page in the prefix cache; returns its chained hash."""
        chunk = tuple(tokens)
        h = chain_hash(parent, chunk)
        if h not in self._page_of and page not in self._hash_of:
            self._page_of[h] = page
            self._hash_of[page] = h
            self._tokens_of[page] = chunk
        return h

    def _evict(self) -> int:
        page, _ = self._cached.popitem(last=False)
        del self._page_of[self._hash_of.pop(page)]
        del self._tokens_of[page]
        return page

    def refcount(self, page: int) -> int:
        return self._refs[page]

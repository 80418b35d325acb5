"""PagePool bookkeeping: reference counts, prefix matching and LRU eviction."""

import pytest

from mpiserve.engine.page_pool import ROOT_HASH, PagePool
from mpiserve.errors import CapacityError


def publish(pool, pages, tokens):
    parent = ROOT_HASH
    for k, page in enumerate(pages):
        parent = pool.register(page, parent, tokens[k * pool.page_size:(k + 1) * pool.page_size])


def test_allocate_release_counts():
    pool = PagePool(num_pages=4, page_size=2)
    pages = pool.allocate(3)
    assert len(set(pages)) == 3 and pool.num_available == 1
    pool.release(pages)
    assert pool.num_available == 4
    with pytest.raises(CapacityError, match="asked for 5 KV pages, 4 available"):
        pool.allocate(5)


def test_prefix_match_only_full_pages_and_verifies_tokens():
    pool = PagePool(num_pages=8, page_size=4)
    tokens = list(range(10))
    pages = pool.allocate(3)
    publish(pool, pages[:2], tokens)
    matched, hashes = pool.match_prefix(tokens + [99])
    assert matched == pages[:2] and len(hashes) == 2
    assert pool.match_prefix(tokens, limit=7)[0] == pages[:1]
    assert pool.match_prefix([0, 1, 2, 5] + tokens[4:])[0] == []


def test_released_cached_page_is_revived_then_evicted_lru_first():
    pool = PagePool(num_pages=3, page_size=2)
    a, b = pool.allocate(2)
    publish(pool, [a], [1, 2])
    pool.register(b, ROOT_HASH, [3, 4])
    pool.release([a, b])
    assert pool.num_available == 3
    matched, _ = pool.match_prefix([1, 2, 9])
    pool.acquire(matched)
    assert matched == [a] and pool.refcount(a) == 1
    pool.release(matched)
    fresh = pool.allocate(2)           # free page first, then the LRU cached page (b)
    assert b in fresh and a not in fresh
    assert pool.match_prefix([3, 4, 0])[0] == []
    assert pool.match_prefix([1, 2, 0])[0] == [a]


def test_duplicate_registration_keeps_first_page():
    pool = PagePool(num_pages=2, page_size=2)
    a, b = pool.allocate(2)
    h1 = pool.register(a, ROOT_HASH, [5, 6])
    h2 = pool.register(b, ROOT_HASH, [5, 6])
    assert h1 == h2
    pool.release([b])
    assert pool.num_available == 1       # b was never published, so it is plainly free
    assert pool.match_prefix([5, 6, 7])[0] == [a]


def test_over_release_is_caught():
    pool = PagePool(num_pages=1, page_size=1)
    page = pool.allocate(1)
    pool.release(page)
    with pytest.raises(AssertionError):
        pool.release(page)

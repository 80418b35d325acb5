"""Scheduler bookkeeping without a model: budgets, chunking, prefix reuse, preemption."""

import pytest

from mpiserve.engine.page_pool import PagePool
from mpiserve.engine.sampling_params import SamplingParams
from mpiserve.engine.scheduler import Scheduler
from mpiserve.engine.sequence import Sequence
from mpiserve.errors import CapacityError, InvalidRequestError


def make(num_pages=64, page_size=4, budget=16, max_seqs=8, max_len=256):
    return Scheduler(PagePool(num_pages, page_size), max_seqs, budget, max_len)


def run_step(sched, next_token=7):
    """Mark every scheduled chunk computed and append a token where one is sampled."""
    chunks = sched.schedule()
    for chunk in chunks:
        sched.computed(chunk)
        if chunk.samples:
            chunk.seq.output.append(next_token)
    return chunks


def test_long_prompt_is_chunked_under_the_budget():
    sched = make(budget=16)
    seq = Sequence("a", list(range(40)), SamplingParams(max_tokens=4))
    sched.add(seq)
    lengths = [c.length for c in run_step(sched)] + [c.length for c in run_step(sched)]
    assert lengths == [16, 16]
    last = run_step(sched)
    assert [(c.start, c.length, c.samples) for c in last] == [(32, 8, True)]
    assert [(c.start, c.length) for c in run_step(sched)] == [(40, 1)]


def test_decodes_come_before_new_prefills():
    sched = make(budget=8)
    first = Sequence("a", list(range(5)), SamplingParams(max_tokens=8))
    sched.add(first)
    run_step(sched)
    sched.add(Sequence("b", list(range(100, 120)), SamplingParams(max_tokens=8)))
    chunks = run_step(sched)
    assert [(c.seq.seq_id, c.length) for c in chunks] == [("a", 1), ("b", 7)]


def test_prefix_cache_hit_skips_full_pages_but_never_the_last_token():
    sched = make(page_size=4, budget=64)
    prompt = list(range(12))
    a = Sequence("a", prompt, SamplingParams(max_tokens=2))
    sched.add(a)
    run_step(sched)
    sched.finish(a)
    b = Sequence("b", prompt, SamplingParams(max_tokens=2))
    sched.add(b)
    (chunk,) = run_step(sched)
    assert (chunk.start, chunk.length) == (8, 4)    # two pages reused, last page recomputed
    assert b.prefix_matched == 8


def test_preemption_when_pages_run_out_then_recompute():
    sched = make(num_pages=4, page_size=4, budget=64)
    a = Sequence("a", list(range(7)), SamplingParams(max_tokens=6))
    b = Sequence("b", list(range(50, 57)), SamplingParams(max_tokens=6))
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert len(sched.running) == 2
    run_step(sched)          # both reach 8 tokens: 2 pages each, pool full
    run_step(sched)          # a needs a third page: b is preempted
    assert sched.num_preemptions == 1 and b in sched.waiting and b.num_computed == 0
    assert len(b.output) == 2


def test_refuses_what_can_never_fit():
    sched = make(num_pages=2, page_size=4, max_len=64)
    with pytest.raises(CapacityError, match="needs 3 KV pages"):
        sched.add(Sequence("x", [1] * 6, SamplingParams(max_tokens=5)))
    with pytest.raises(InvalidRequestError, match="empty prompt"):
        sched.add(Sequence("y", [], SamplingParams()))
    with pytest.raises(InvalidRequestError, match="context of 64"):
        sched.add(Sequence("z", [1] * 64, SamplingParams()))


def holding(sched, seq_id, prompt, received):
    """A sequence as start_generate queues it after prep_recv: pages reserved for, and the KV
    written of, its first `received` positions (the engine computes the rest itself)."""
    seq = Sequence(seq_id, prompt, SamplingParams(max_tokens=4))
    seq.page_ids = sched.pool.allocate(sched.pool.pages_for(received))
    seq.num_computed = received
    sched.add(seq)
    return seq


def test_a_sequence_holding_pages_passes_a_head_that_does_not_fit():
    sched = make(num_pages=6, page_size=4, budget=64)
    head = Sequence("head", list(range(20)), SamplingParams(max_tokens=4))   # needs 5 pages
    sched.add(head)
    held = holding(sched, "held", list(range(100, 112)), received=12)        # holds 3
    (chunk,) = sched.schedule()
    assert (chunk.seq, chunk.start, chunk.length) == (held, 11, 1)
    assert list(sched.waiting) == [head]


def test_waiting_holders_give_pages_up_when_nothing_can_run():
    sched = make(num_pages=4, page_size=4, budget=64)
    head = Sequence("head", list(range(12)), SamplingParams(max_tokens=4))   # needs 3 pages
    sched.add(head)
    first = holding(sched, "first", list(range(100, 112)), received=8)      # holds 2 of 3
    last = holding(sched, "last", list(range(200, 212)), received=8)        # holds 2: full
    chunks = sched.schedule()      # none fits; the last holder lets go, then the first fits
    assert [(c.seq, c.start, c.length) for c in chunks] == [(first, 8, 4)]
    assert last.page_ids == [] and last.num_computed == 0 and last.num_preemptions == 1
    assert list(sched.waiting) == [head, last] and sched.num_preemptions == 1
    for _ in range(40):                          # and everything finishes from there
        if not sched.has_work:
            break
        for chunk in run_step(sched):
            if len(chunk.seq.output) == 4:
                sched.finish(chunk.seq)
    assert not sched.has_work

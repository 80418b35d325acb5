"""What one engine does with requests, pages and computed chunks, apart from the forward pass
and sampling (pure bookkeeping, no torch).

The real `Engine` adds the model, the KV tensors and the sampler; the simulator's engine adds a
cost model. Both run these methods unchanged, so a simulated engine reserves, matches prefixes,
preempts and finishes sequences exactly as a real one does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

from ..errors import InvalidRequestError
from .page_pool import PagePool
from .sampling_params import SamplingParams
from .scheduler import Chunk, Scheduler
from .sequence import Sequence
from .stopping import finish_reason

# Picks the next token of a sequence whose chunk just completed its computed positions.
TokenPicker = Callable[[Sequence], int]

SEND_PARAMS = SamplingParams(max_tokens=1)      # of a remote_send's prefill (samples nothing)


class TokenEvent(NamedTuple):       # a tuple: one per generated token
    """What one step did for one sequence: a new token, and whether it finished."""
    seq: Sequence
    token: int | None
    finished: bool


class EngineCore:
    def __init__(self, pool: PagePool, scheduler: Scheduler, vocab_size: int,
                 eos_ids: tuple[int, ...], max_model_len: int):
        self.pool = pool
        self.scheduler = scheduler
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.tokens_computed = {"prefill": 0, "decode": 0}

    # ---- hooks for what the subclass keeps per sequence (the real engine: its generator) ------
    def _started(self, seq: Sequence) -> None:
        """A sequence begins to generate."""

    def _retired(self, seq: Sequence) -> None:
        """A sequence left the scheduler for good."""

    def _text_of(self, seq: Sequence) -> Callable[[list[int]], str] | None:
        """Turns output ids into text, for stop strings (None: stop strings never match); asked
        only about sequences that have stop strings."""
        return None

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, seq_id, prompt: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(seq_id, prompt, params)
        self.check_tokens(seq)
        self.scheduler.add(seq)
        self._started(seq)
        return seq

    def check_tokens(self, seq: Sequence) -> None:
        prompt = seq.prompt
        if prompt and 0 <= min(prompt) and max(prompt) < self.vocab_size:
            return                                   # the usual case, without a Python loop
        bad = next((t for t in prompt if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequestError(f"request {seq.seq_id!r}: token id {bad} is outside the "
                                      f"vocabulary of {self.vocab_size}")

    def abort(self, seq: Sequence) -> None:
        """Stop a request: the sequence and the other samples forked from it."""
        for each in [seq, *seq.forks]:
            self._retire(each)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._retired(seq)

    # ---- microserving: KV that moves between engines --------------------------------------
    def reserve(self, seq_id, prompt: list[int], params: SamplingParams,
                end: int) -> Sequence | None:
        """prep_recv: take the cached prefix of prompt[:end] and reserve pages for the rest of
        [0, end). None when the pages are not free yet; raises if they never can be."""
        seq = Sequence(seq_id, prompt, params)
        self.check_tokens(seq)
        self.scheduler.check_fits(seq)
        pages, hashes = self.pool.match_prefix(prompt, limit=min(end, len(prompt) - 1))
        self.pool.acquire(pages)
        fresh = self.pool.pages_for(end) - len(pages)
        if fresh > self.pool.num_available:
            self.pool.release(pages)
            return None
        seq.page_ids = pages + self.pool.allocate(fresh)
        seq.page_hashes = hashes
        seq.num_computed = seq.prefix_matched = len(pages) * self.pool.page_size
        return seq

    def kv_received(self, seq: Sequence, end: int) -> None:
        """The KV of positions [num_computed, end) of a reserved sequence has been written."""
        seq.num_computed = max(seq.num_computed, end)
        self.scheduler.publish_full_pages(seq)

    def drop_reserved_tail(self, seq: Sequence) -> None:
        """A transfer failed: free the pages beyond what the sequence already holds."""
        keep = self.pool.pages_for(seq.num_computed)
        self.pool.release(seq.page_ids[keep:])
        del seq.page_ids[keep:]

    def generate_reserved(self, seq: Sequence) -> None:
        """start_generate on a sequence that holds KV from prep_recv (and remote_send)."""
        if seq.needs_prompt_logits:          # scored here: the received KV is recomputed
            self.release(seq)
            seq.num_computed = 0
        self.scheduler.add(seq)
        self._started(seq)

    def start_generation(self, seq_id, prompt: list[int], params: SamplingParams,
                         reserved: Sequence | None, begin: int) -> Sequence:
        """start_generate: on the reservation prep_recv made (if any), else a new sequence.
        `fallback` tells whether it lacks KV up to `begin` that it should have received."""
        if reserved is None:
            seq, held = self.add_request(seq_id, prompt, params), 0
        else:
            seq, held = reserved, reserved.num_computed
            self.generate_reserved(seq)
        seq.fallback = held < min(begin, len(prompt) - 1)
        return seq

    def prefill_for_send(self, seq_id, prompt: list[int]) -> Sequence:
        """remote_send: compute the KV of `prompt` (prefix cache first), sample nothing."""
        seq = Sequence(seq_id, prompt, SEND_PARAMS, prefill_only=True)
        self.check_tokens(seq)
        self.scheduler.add(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        """Give back the pages of a sequence that left the scheduler (a reservation, a send)."""
        self.scheduler.release_pages(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def bookkeeping_stats(self) -> dict:
        """The scheduler's, page pool's and token counters' part of the engine's stats."""
        pool = self.pool
        return {"running": len(self.scheduler.running),
                "waiting": len(self.scheduler.waiting), "pages_used": pool.num_used,
                "pages_total": pool.num_pages, "prefix_hit_tokens": pool.hit_tokens,
                "prefix_query_tokens": pool.queried_tokens,
                "prefill_tokens": self.tokens_computed["prefill"],
                "decode_tokens": self.tokens_computed["decode"],
                "preemptions": self.scheduler.num_preemptions}

    # ---- after a step's forward pass ---------------------------------------------------------
    def chunk_computed(self, chunk: Chunk, pick: TokenPicker) -> list[TokenEvent]:
        """Record a computed chunk; sample with `pick` where the chunk ends a sequence's
        known tokens; finish a remote_send's prefill."""
        self.scheduler.computed(chunk)
        self._count(chunk)
        if chunk.samples:
            return self._sample_next(chunk.seq, pick)
        if chunk.seq.prefill_only and chunk.end == chunk.seq.num_tokens:
            self.scheduler.finish(chunk.seq, release=False)     # pages go with the send
            return [TokenEvent(chunk.seq, None, True)]
        return []

    def _count(self, chunk: Chunk) -> None:
        kind = "decode" if chunk.start >= len(chunk.seq.prompt) else "prefill"
        self.tokens_computed[kind] += chunk.length

    def _sample_next(self, seq: Sequence, pick: TokenPicker) -> list[TokenEvent]:
        """The sequence's next token; after a request's first, its other n - 1 samples."""
        if seq.params.n == 1 or seq.sample_index != 0 or seq.output:
            return [self._append_token(seq, pick(seq))]
        samples = self._fork(seq)                         # before seq may finish and free
        return [self._append_token(s, pick(s)) for s in [seq, *samples]]

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """Samples 1..n-1 of a request whose prompt is computed: each holds the prompt's full
        pages with it, samples its first token from the same logits, and then computes only
        the prompt's last partial page, with that token, before decoding on its own."""
        full = len(seq.page_hashes)
        samples = []
        for index in range(1, seq.params.n):
            sample_seq = Sequence(seq.seq_id, seq.prompt, seq.params.for_sample(index),
                                  sample_index=index)
            sample_seq.page_ids, sample_seq.page_hashes = seq.page_ids[:full], list(
                seq.page_hashes)
            self.pool.acquire(sample_seq.page_ids)
            sample_seq.num_computed = full * self.pool.page_size
            sample_seq.prompt_logprobs = seq.prompt_logprobs
            sample_seq.arrival_time = seq.arrival_time
            self.scheduler.add(sample_seq, first=True)
            self._started(sample_seq)
            samples.append(sample_seq)
        seq.forks = samples
        return samples

    def _append_token(self, seq: Sequence, token: int) -> TokenEvent:
        seq.output.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        text_of = self._text_of(seq) if seq.params.stop else None
        seq.finish_reason = finish_reason(seq, self.eos_ids, self.max_model_len, text_of)
        if seq.finish_reason is not None:
            seq.finish_time = time.monotonic()
            self._retire(seq)
        return TokenEvent(seq, token, seq.finish_reason is not None)

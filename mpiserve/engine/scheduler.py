"""Continuous batching with chunked prefill under a per-step token budget (pure bookkeeping).

Each step first serves running sequences (decodes and unfinished prefills) in arrival order,
then admits waiting ones (one that already holds pages may pass the head of the queue). When
pages run out, the most recently admitted running sequence is preempted: its pages are
released (its full pages stay in the prefix cache) and it is recomputed later, which changes
nothing in its output.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

from ..errors import CapacityError, InvalidRequestError
from .page_pool import ROOT_HASH, PagePool
from .sequence import Sequence, SequenceStatus


class Chunk(NamedTuple):            # a tuple: one per scheduled sequence and step
    """Positions [start, start + length) of `seq` computed in one step; `samples` tells whether
    the step then samples the sequence's next token (fixed when the chunk is scheduled, by
    `Chunk.of`)."""
    seq: Sequence
    start: int
    length: int
    samples: bool

    @classmethod
    def of(cls, seq: Sequence, start: int, length: int) -> Chunk:
        """The chunk of `seq` from `start`, as its tokens stand now."""
        return cls(seq, start, length,
                   start + length == seq.num_tokens and not seq.prefill_only)

    @property
    def end(self) -> int:
        return self.start + self.length


class Scheduler:
    def __init__(self, pool: PagePool, max_num_seqs: int, max_batch_tokens: int,
                 max_model_len: int):
        self.pool = pool
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence, first: bool = False) -> None:
        """Queue a sequence, last (or `first`: the extra samples of a running request)."""
        self.check_fits(seq)
        seq.status = SequenceStatus.WAITING
        if first:
            self.waiting.appendleft(seq)
        else:
            self.waiting.append(seq)

    def check_fits(self, seq: Sequence) -> None:
        """Refuse a sequence that could never fit the context or the page pool."""
        if not seq.prompt:
            raise InvalidRequestError(f"request {seq.seq_id!r}: empty prompt")
        if len(seq.prompt) >= self.max_model_len and not seq.prefill_only:
            raise InvalidRequestError(
                f"request {seq.seq_id!r}: prompt of {len(seq.prompt)} tokens leaves no room to "
                f"generate in the model's context of {self.max_model_len} tokens")
        if len(seq.prompt) > self.max_model_len:
            raise InvalidRequestError(f"request {seq.seq_id!r}: prompt of {len(seq.prompt)} "
                                      f"tokens exceeds the context of {self.max_model_len}")
        need = self.pool.pages_for(min(seq.max_total_tokens(), self.max_model_len))
        if need > self.pool.num_pages:
            raise CapacityError(f"request {seq.seq_id!r} needs {need} KV pages but the pool has "
                                f"only {self.pool.num_pages}; raise --kv-cache-gib")

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Chunk]:
        budget = self.max_batch_tokens
        chunks: list[Chunk] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            length = min(seq.num_uncomputed, budget)
            if self._grow(seq, seq.num_computed + length):
                chunks.append(Chunk.of(seq, seq.num_computed, length))
                budget -= length
                i += 1
            else:
                self._preempt(self.running[-1])
                preempted = True
        while self.waiting and budget > 0 and not preempted \
                and len(self.running) < self.max_num_seqs:
            chunk = self._admit_next(budget)
            if chunk is None:
                break
            chunks.append(chunk)
            budget -= chunk.length
        return chunks

    def _admit_next(self, budget: int) -> Chunk | None:
        """Admit the first waiting sequence that fits: the head, else one behind it that
        already holds pages (KV received through prep_recv, or a fork), since only running
        sequences give pages back. When nothing runs and none fits, waiting holders give
        their pages up, last first, until one fits: a pool held entirely by waiting sequences
        would otherwise never move again."""
        while True:
            head, *rest = self.waiting
            for seq in [head, *(s for s in rest if s.page_ids)]:
                chunk = self._admit(seq, budget)
                if chunk is not None:
                    self.waiting.remove(seq)
                    return chunk
            holder = next((s for s in reversed(self.waiting) if s.page_ids), None)
            if self.running or holder is None:
                return None
            self._drop_progress(holder)

    def computed(self, chunk: Chunk) -> None:
        """Record that a chunk's KV is written; publish newly full pages to the prefix cache."""
        seq = chunk.seq
        seq.num_computed = chunk.end
        self.publish_full_pages(seq)

    def publish_full_pages(self, seq: Sequence) -> None:
        size = self.pool.page_size
        if (len(seq.page_hashes) + 1) * size > seq.num_computed:
            return                       # no page filled (most steps): no token list copied
        tokens = seq.tokens
        while (len(seq.page_hashes) + 1) * size <= seq.num_computed:
            k = len(seq.page_hashes)
            parent = seq.page_hashes[-1] if seq.page_hashes else ROOT_HASH
            seq.page_hashes.append(
                self.pool.register(seq.page_ids[k], parent, tokens[k * size:(k + 1) * size]))

    def finish(self, seq: Sequence, release: bool = True) -> None:
        seq.status = SequenceStatus.FINISHED
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if release:
            self.release_pages(seq)

    def release_pages(self, seq: Sequence) -> None:
        self.pool.release(seq.page_ids)
        seq.page_ids, seq.page_hashes = [], []

    def _admit(self, seq: Sequence, budget: int) -> Chunk | None:
        matched_here = not seq.page_ids
        if matched_here:
            limit = 0 if seq.needs_prompt_logits else seq.num_tokens - 1
            pages, hashes = self.pool.match_prefix(seq.tokens, limit=limit)
            self.pool.acquire(pages)
            seq.page_ids, seq.page_hashes = pages, hashes
            seq.num_computed = len(pages) * self.pool.page_size
            if seq.num_preemptions == 0:
                seq.prefix_matched = max(seq.prefix_matched, seq.num_computed)
        seq.num_computed = min(seq.num_computed, seq.num_tokens - 1)
        length = min(seq.num_uncomputed, budget)
        if not self._grow(seq, seq.num_computed + length):
            if matched_here:
                self.release_pages(seq)
                seq.num_computed = 0
            return None
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return Chunk.of(seq, seq.num_computed, length)

    def _grow(self, seq: Sequence, upto: int) -> bool:
        need = self.pool.pages_for(upto) - len(seq.page_ids)
        if need <= 0:
            return True
        if need > self.pool.num_available:
            return False
        seq.page_ids.extend(self.pool.allocate(need))
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._drop_progress(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)

    def _drop_progress(self, seq: Sequence) -> None:
        """Give a sequence's pages back; it recomputes later (its full pages stay in the
        prefix cache until they are needed)."""
        self.release_pages(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1

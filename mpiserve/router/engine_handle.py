"""The three microserving calls on one engine rank, as routers use them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import NamedTuple

from ..cluster.messages import KVAddress, Request, TokenUpdate, TransferDone
from ..errors import RouterMisuseError
from .dispatcher import Dispatcher


class Load(NamedTuple):             # a tuple: least_loaded reads one per engine per request
    """Rank 0's live view of one engine's work."""
    active: int                 # requests generating, sending KV or holding pages on it
    queued_prefill: int         # prompt tokens given to it to prefill, not yet done
    running: int                # as last reported by the engine
    waiting: int
    pages_free: int


class EngineHandle:
    def __init__(self, rank: int, role: str, dispatcher: Dispatcher, cluster, tp: int = 1):
        self.rank, self.role = rank, role
        self.tp = tp                      # ranks the engine's model is split over
        self._dispatcher = dispatcher
        self._cluster = cluster
        self._active = 0
        self._queued_prefill = 0

    def __repr__(self) -> str:
        return f"<engine rank {self.rank} ({self.role}{f', TP {self.tp}' if self.tp > 1 else ''})>"

    @property
    def load(self) -> Load:
        stats = self._dispatcher.stats.get(self.rank, {})
        active = self._active + self._cluster.reservations_on(self.rank)
        return Load(active, self._queued_prefill, stats.get("running", 0),
                    stats.get("waiting", 0),
                    stats.get("pages_total", 0) - stats.get("pages_used", 0))

    async def prep_recv(self, request: Request, end: int | None = None) -> KVAddress:
        """Match prompt[:end] in this engine's prefix cache and reserve pages for the rest."""
        trace = self._cluster.trace(request)
        trace.engines.add(self.rank)
        self._cluster.set_reserved(request, trace, self.rank, True)   # counts in its load
        try:
            kv = await self._dispatcher.call(self.rank, "prep_recv", request, end=end)
        except BaseException:
            self._cluster.set_reserved(request, trace, self.rank, False)
            raise
        trace.prefix_matched = max(trace.prefix_matched, kv.matched)
        return kv

    async def release(self, request: Request) -> None:
        """Give back the pages prep_recv reserved here for a request that will not generate
        here. The runtime does this for reservations left over when a request ends."""
        await self._dispatcher.call(self.rank, "release", request)
        self._unreserve(request)

    async def abort(self, request: Request) -> None:
        """Drop everything this engine holds or does for a request: a reservation (granted or
        waiting) and its generation. The runtime does this when a request times out."""
        await self._dispatcher.call(self.rank, "abort", request)
        self._unreserve(request)

    async def remote_send(self, request: Request, kv: KVAddress, begin: int = 0,
                          end: int | None = None) -> TransferDone:
        """Compute what this engine lacks of prompt[:end] and send the KV of [begin, end) into
        the receiver's pages. Returns once the receiver holds them, or the transfer failed (the
        receiver then recomputes; `ok` is False)."""
        trace = self._cluster.trace(request)
        trace.engines.add(self.rank)
        stop = request.resolve(end, len(request.prompt))
        work = self._claim_prefill(request.prompt, 0, stop)
        self._active += 1
        self._queued_prefill += work
        try:
            done = await self._dispatcher.call(self.rank, "remote_send", request, kv=kv,
                                               begin=begin, end=end)
        finally:
            self._active -= 1
            self._queued_prefill -= work
        trace.kv_bytes += done.nbytes
        if done.ok:
            self._cluster.prefixes.add(kv.rank, request.prompt, stop)
        else:
            self._cluster.count_failed_transfer(request, done.reason)
        return done

    async def start_generate(self, request: Request, begin: int = 0) -> AsyncIterator[list[int]]:
        """Prefill prompt[begin:] on top of the KV this engine holds and stream new tokens."""
        trace = self._cluster.trace(request)
        trace.generations += 1
        if trace.generations > 1:
            raise RouterMisuseError(f"start_generate called again for request {request.id!r}: "
                                    "a request generates once, on one engine")
        trace.engines.add(self.rank)
        self._cluster.set_reserved(request, trace, self.rank, False)   # now a generation
        work = self._claim_prefill(request.prompt, request.resolve(begin, 0), len(request.prompt))
        self._active += 1
        self._queued_prefill += work
        queue = self._dispatcher.stream(self.rank, request, begin=begin)
        try:
            while True:
                update = await queue.get()
                if isinstance(update, Exception):
                    raise update
                if work:                          # the prompt is prefilled
                    self._queued_prefill -= work
                    work = 0
                self._record(trace, update)
                yield update.tokens
                if update.done:
                    break
        finally:
            self._active -= 1
            self._queued_prefill -= work

    def _claim_prefill(self, prompt: list[int], begin: int, stop: int) -> int:
        """Prompt tokens in [begin, stop) this engine must compute, given what it holds or will
        hold by then; records prompt[:stop] as held from now on. An engine prefills its requests
        in arrival order, so any later request given here finds these pages computed."""
        held = self._cluster.prefixes.matched(self.rank, prompt[:stop])
        self._cluster.prefixes.add(self.rank, prompt, stop)
        return max(0, stop - max(begin, held))

    def _unreserve(self, request: Request) -> None:
        self._cluster.set_reserved(request, self._cluster.trace(request), self.rank, False)

    def _record(self, trace, update: TokenUpdate) -> None:
        trace.tokens_arrived(len(update.tokens))
        trace.sample_arrived(update.sample, update.tokens, update.logprobs,
                             update.finish_reason)
        if update.done:
            trace.finish_reason = update.finish_reason
            info = update.info or {}
            trace.prefix_matched = max(trace.prefix_matched, info.get("prefix_matched", 0))
            trace.fallbacks += bool(info.get("fallback"))
            trace.prompt_logprobs = info.get("prompt_logprobs")

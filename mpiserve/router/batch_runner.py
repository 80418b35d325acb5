"""Rank 0 serves a batch: each input record goes through the router and comes out as exactly
one output record (a completion or an error), written as soon as it finishes."""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass, field

from ..batch.choices import choices
from ..batch.input_file import BatchItem
from ..batch.output_file import BatchOutput, completion_record, error_record
from ..cluster.messages import Request
from ..model.tokenizer import Tokenizer
from .cluster import Cluster
from .dispatcher import EngineFailure
from .request_prompt import ModelLimits, PromptProblem, prompt_ids
from .request_trace import RequestTrace, SampleTrace
from .route_contract import routed_tokens


@dataclass
class BatchTally:
    total: int = 0              # records in the input
    seen: int = 0               # records read so far
    skipped: int = 0            # already in the output from an earlier run
    completed: int = 0
    failed: int = 0
    abandoned: int = 0          # in flight when a stop's drain time ran out (not written)
    interrupted: bool = False   # admission stopped by a signal
    generated_tokens: int = 0
    started: float = field(default_factory=time.monotonic)
    latencies: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def in_flight(self) -> int:
        return self.seen - self.skipped - self.completed - self.failed - self.abandoned


class BatchRunner:
    def __init__(self, cluster: Cluster, route, router_name: str, tokenizer: Tokenizer,
                 limits: ModelLimits, output: BatchOutput, max_inflight: int,
                 drain_timeout_s: float = 60.0, record_itl: bool = False,
                 ready_poll_s: float = 0.05, request_timeout_s: float = 600.0):
        self.cluster, self.route, self.router_name = cluster, route, router_name
        self.tokenizer, self.limits, self.output = tokenizer, limits, output
        self.max_inflight = max_inflight
        self.drain_timeout_s = drain_timeout_s
        self.request_timeout_s = request_timeout_s
        self.record_itl = record_itl          # per-request inter-token latencies in metrics
        self.ready_poll_s = ready_poll_s
        self.tally = BatchTally()
        self.stopping = asyncio.Event()      # set by SIGTERM/SIGINT: admit nothing more
        self.clock_origin: float | None = None   # when arrival_s 0 is (engines all ready)

    def stop(self) -> None:
        self.tally.interrupted = True
        self.stopping.set()

    async def run(self, items, total: int = 0) -> BatchTally:
        """Serve `items` in file order. The job's clock starts once every engine is ready;
        an item with `arrival_s` is admitted no earlier than that many seconds later."""
        self.tally.total = total
        slots = asyncio.Semaphore(self.max_inflight)
        tasks = set()
        watch = asyncio.create_task(self._stop_on_engine_failure())
        try:
            await self._admit(items, slots, tasks)
        finally:
            watch.cancel()
        return self.tally

    async def _stop_on_engine_failure(self) -> None:
        """A lost engine stops admission at once (not a user's stop: nothing is drained)."""
        await self.cluster.engine_failed()
        self.stopping.set()

    async def _admit(self, items, slots: asyncio.Semaphore, tasks: set) -> None:
        await self._engines_ready()
        self.clock_origin = time.monotonic()
        for item in items:
            if self.stopping.is_set():
                break
            self.tally.seen += 1
            if self.output.is_done(item):
                self.tally.skipped += 1
                continue
            request = self._request_or_error(item)
            if request is None:
                continue
            arrival = time.monotonic()
            if item.arrival_s is not None:
                arrival = self.clock_origin + item.arrival_s
                if not await self._sleep_until(arrival):
                    self.tally.seen -= 1
                    break
            self.cluster.trace(request).arrival = arrival
            if not await self._take_slot(slots):
                self.cluster.pop_trace(request)
                self.tally.seen -= 1
                break
            task = asyncio.create_task(self._serve(item, request))
            tasks.add(task)
            task.add_done_callback(lambda t: (tasks.discard(t), slots.release()))
        self.cluster.check_engines()
        await self._finish(set(tasks))
        self.cluster.check_engines()

    async def _engines_ready(self) -> None:
        """Wait (polling gently) until every engine has loaded and reported, or a stop."""
        while not self.cluster.engines_ready() and not self.stopping.is_set():
            self.cluster.check_engines()               # raises if an engine died meanwhile
            try:
                await asyncio.wait_for(self.stopping.wait(), self.ready_poll_s)
            except asyncio.TimeoutError:
                pass

    async def _sleep_until(self, when: float) -> bool:
        """Sleep until monotonic time `when`, or a stop; True if the time came first."""
        delay = when - time.monotonic()
        if delay > 0:
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except asyncio.TimeoutError:
                pass
        return not self.stopping.is_set()

    async def _take_slot(self, slots: asyncio.Semaphore) -> bool:
        """Wait for a free slot or a stop; True if a slot was taken."""
        take = asyncio.ensure_future(slots.acquire())
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({take, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if take.done() and not take.cancelled() and not self.stopping.is_set():
            return True
        if take.done() and not take.cancelled():
            slots.release()
        take.cancel()
        return False

    async def _finish(self, tasks: set) -> None:
        """Wait for the requests in flight; after a stop, for at most the drain time."""
        everything = asyncio.gather(*tasks)
        stop = asyncio.ensure_future(self.stopping.wait())
        await asyncio.wait({everything, stop}, return_when=asyncio.FIRST_COMPLETED)
        stop.cancel()
        if everything.done():
            everything.result()
            return
        self.cluster.check_engines()
        try:
            await asyncio.wait_for(everything, self.drain_timeout_s)
        except asyncio.TimeoutError:
            self.tally.abandoned = sum(not t.done() or t.cancelled() for t in tasks)

    def _request_or_error(self, item: BatchItem) -> Request | None:
        if item.error is not None:
            self._write_error(item, item.error, item.error_code)
            return None
        try:
            prompt = prompt_ids(item, self.tokenizer, self.limits)
        except PromptProblem as problem:
            self._write_error(item, f"line {item.line_no}: {problem}")
            return None
        return Request(item.custom_id, prompt, item.params)

    async def _serve(self, item: BatchItem, request: Request) -> None:
        """Exactly one record for `item`, whatever the router does. A lost engine ends the
        job instead: the request is left without a record, so the re-run serves it again."""
        try:
            await self._serve_or_fail(item, request)
        except EngineFailure:
            return

    async def _serve_or_fail(self, item: BatchItem, request: Request) -> None:
        trace = self.cluster.trace(request)
        trace.started = time.monotonic()
        try:
            tokens = await asyncio.wait_for(self._routed_tokens(request),
                                            self.request_timeout_s)
            trace.finished = time.monotonic()
            await self.cluster.release_leftovers(request)
            self._write_result(item, request, tokens, self.cluster.pop_trace(request))
        except EngineFailure:
            raise
        except asyncio.TimeoutError:
            await self.cluster.abort_everywhere(request)
            self.cluster.pop_trace(request)
            self._write_error(item, f"router {self.router_name} did not finish "
                              f"{item.custom_id!r} within --request-timeout "
                              f"{self.request_timeout_s:g} s; the request was aborted",
                              code="request_timeout")
        except Exception as exc:
            await self.cluster.release_leftovers(request)
            self.cluster.pop_trace(request)
            self._write_error(item, f"router {self.router_name} failed on {item.custom_id!r}: "
                              f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                              code="router_error")

    async def _routed_tokens(self, request: Request) -> list[int]:
        tokens: list[int] = []
        async for chunk in routed_tokens(self.route, request, self.cluster,
                                         self.limits.vocab_size):
            tokens.extend(chunk)
        return tokens

    def _write_result(self, item, request, tokens, trace) -> None:
        samples = _samples(request, tokens, trace)
        made = choices(item, request.prompt, samples, trace.prompt_logprobs, self.tokenizer)
        metrics = trace.metrics(self.router_name, itl=self.record_itl)
        self.output.write(completion_record(item, request.id, made, len(request.prompt),
                                            metrics, self.limits.name))
        self.tally.completed += 1
        self.tally.generated_tokens += len(tokens)
        self.tally.latencies.append(metrics)

    def _write_error(self, item: BatchItem, message: str, code: str = "invalid_request") -> None:
        self.output.write(error_record(item, message, code))
        self.tally.failed += 1
        self.tally.errors.append(message.splitlines()[0] if message else code)


def _samples(request: Request, tokens: list[int], trace: RequestTrace) -> list[SampleTrace]:
    """Each sample of a finished request. With one sample, its tokens are those the router
    yielded; with n, the router's stream interleaves them and each comes from its own."""
    if request.params.n > 1:
        return [trace.samples[i] for i in range(request.params.n)]
    first = trace.samples.get(0, SampleTrace())
    return [SampleTrace(tokens, first.logprobs, trace.finish_reason or "length")]

"""Rank 0 serves a batch: each input record goes through the router and comes out as exactly
one output record (a completion or an error), written as soon as it finishes."""

from __future__ import annotations

import asyncio
import time
import traceback
from dataclasses import dataclass, field
from numbers import Integral

from ..batch.choices import choices
from ..batch.input_file import BatchItem
from ..batch.output_file import BatchOutput, completion_record, error_record
from ..cluster.messages import Request
from ..errors import RouterMisuseError
from ..model.tokenizer import Tokenizer
from .cluster import Cluster
from .dispatcher import EngineFailure
from .request_trace import RequestTrace, SampleTrace


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


def checked_tokens(chunk, vocab_size: int) -> list[int]:
    """A router's yield must be a list of token ids in [0, vocab_size)."""
    if not isinstance(chunk, list | tuple) or not all(
            isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < vocab_size
            for t in chunk):
        raise RouterMisuseError(f"the router yielded {chunk!r:.80}; a router yields lists of "
                                f"token ids in [0, {vocab_size})")
    return [int(t) for t in chunk]


@dataclass(frozen=True)
class ModelLimits:
    name: str
    vocab_size: int
    max_model_len: int


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
            prompt = self._prompt_ids(item)
        except Exception as exc:          # a template or tokenizer failure on this record
            self._write_error(item, f"line {item.line_no}: {type(exc).__name__}: {exc}")
            return None
        problem = self._prompt_problem(prompt)
        if problem:
            self._write_error(item, f"line {item.line_no}: {problem}")
            return None
        return Request(item.custom_id, prompt, item.params)

    def _prompt_ids(self, item: BatchItem) -> list[int]:
        if item.kind == "chat":
            text = self.tokenizer.apply_chat_template(item.messages)
            return self.tokenizer.encode(text, add_special_tokens=False)
        if isinstance(item.prompt, str):
            return self.tokenizer.encode(item.prompt)
        return list(item.prompt)

    def _prompt_problem(self, prompt: list[int]) -> str | None:
        limits = self.limits
        if not prompt:
            return "the prompt is empty after tokenization"
        if len(prompt) >= limits.max_model_len:
            return (f"prompt of {len(prompt)} tokens leaves no room to generate in the "
                    f"context of {limits.max_model_len} tokens")
        bad = next((t for t in prompt if t >= limits.vocab_size), None)
        if bad is not None:
            return f"token id {bad} is outside the vocabulary of {limits.vocab_size}"
        return None

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
            await self._release_leftovers(request)
            self._write_result(item, request, tokens, self.cluster.pop_trace(request))
        except EngineFailure:
            raise
        except asyncio.TimeoutError:
            await self._abort_everywhere(request)
            self.cluster.pop_trace(request)
            self._write_error(item, f"router {self.router_name} did not finish "
                              f"{item.custom_id!r} within --request-timeout "
                              f"{self.request_timeout_s:g} s; the request was aborted",
                              code="request_timeout")
        except Exception as exc:
            await self._release_leftovers(request)
            self.cluster.pop_trace(request)
            self._write_error(item, f"router {self.router_name} failed on {item.custom_id!r}: "
                              f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}",
                              code="router_error")

    async def _routed_tokens(self, request: Request) -> list[int]:
        """The tokens the router yields, checked against the router contract."""
        tokens: list[int] = []
        async for chunk in self.route(request, self.cluster):
            tokens.extend(checked_tokens(chunk, self.limits.vocab_size))
        if self.cluster.trace(request).finish_reason is None:
            raise RouterMisuseError("the router returned before a start_generate stream "
                                    "finished: it must yield one stream to its end")
        return tokens

    async def _release_leftovers(self, request: Request) -> None:
        """Free pages the router reserved with prep_recv but never generated on (it failed,
        or chose another engine); kept, they would shrink the engine's pool for good."""
        reserved = self.cluster.trace(request).reserved
        for engine in [e for e in self.cluster.engines if e.rank in reserved]:
            await engine.release(request)

    async def _abort_everywhere(self, request: Request) -> None:
        """After a timeout: every engine the request touched drops its reservation and stops
        generating it (its pages are freed, no token follows)."""
        touched = self.cluster.trace(request).engines
        for engine in [e for e in self.cluster.engines if e.rank in touched]:
            await engine.abort(request)

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

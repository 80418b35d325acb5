"""Rank 0 in `mpiserve serve`: each HTTP request becomes a task that drives the router, the
same routers as in batch runs. The task reports progress on a queue; the HTTP side reads each
sample's tokens from the request's trace, whole (one JSON body) or as they come (SSE)."""

from __future__ import annotations

import asyncio
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from ..batch.choices import choices
from ..batch.input_file import BatchItem, body_item
from ..batch.output_file import completion_body
from ..cluster.messages import Request
from ..model.tokenizer import Tokenizer
from ..router.batch_runner import BatchTally
from ..router.cluster import Cluster
from ..router.dispatcher import EngineFailure
from ..router.request_prompt import ModelLimits, PromptProblem, prompt_ids
from ..router.request_trace import RequestTrace, SampleTrace
from ..router.route_contract import routed_tokens
from .prometheus import TPOT_BUCKETS, TTFT_BUCKETS, Histogram

DISCONNECT_POLL_S = 0.5


class ApiError(Exception):
    """An HTTP error answer: status, message, OpenAI error code, extra headers."""

    def __init__(self, status: int, message: str, code: str = "invalid_request",
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.code, self.headers = status, code, headers or {}

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": None, "code": self.code}}


@dataclass(frozen=True)
class Ended:
    """The request's task is over: its trace is complete, or `error` says why not."""
    error: ApiError | None = None


PROGRESS = object()          # queue item: the router yielded, the trace has new tokens


@dataclass
class OnlineRequest:
    item: BatchItem
    request: Request
    trace: RequestTrace
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    task: asyncio.Task | None = None

    def samples(self) -> list[SampleTrace]:
        return [self.trace.samples.get(i) or SampleTrace()
                for i in range(self.request.params.n)]


class OnlineRunner:
    def __init__(self, cluster: Cluster, route, router_name: str, tokenizer: Tokenizer,
                 limits: ModelLimits, max_inflight: int, request_timeout_s: float = 600.0):
        self.cluster, self.route, self.router_name = cluster, route, router_name
        self.tokenizer, self.limits = tokenizer, limits
        self.max_inflight, self.request_timeout_s = max_inflight, request_timeout_s
        self.tally = BatchTally()
        self.outcomes: Counter[str] = Counter()
        self.histograms = {"mpiserve_ttft_seconds": Histogram(TTFT_BUCKETS),
                           "mpiserve_tpot_seconds": Histogram(TPOT_BUCKETS)}
        self.live: dict[str, OnlineRequest] = {}
        self.accepting = True
        self.stopping = asyncio.Event()

    def stop(self) -> None:
        """Accept nothing more (a stop signal); requests in flight go on."""
        self.accepting = False
        self.tally.interrupted = True
        self.stopping.set()

    # ---- admission ----------------------------------------------------------------------------
    def start(self, body, kind: str) -> OnlineRequest:
        """Admit a request and start its task, or raise the ApiError that answers it."""
        self._check_room()
        request_id = uuid.uuid4().hex
        item = body_item(body, kind, request_id) if isinstance(body, dict) else BatchItem(
            0, request_id, kind, error="the request body must be a JSON object")
        if item.error is not None:
            raise ApiError(400, item.error)
        if body.get("stream") and item.echo:
            raise ApiError(400, "body.echo is not supported with body.stream; ask for the "
                           "whole answer instead")
        try:
            prompt = prompt_ids(item, self.tokenizer, self.limits)
        except PromptProblem as problem:
            raise ApiError(400, str(problem)) from None
        request = Request(request_id, prompt, item.params)
        online = OnlineRequest(item, request, self.cluster.trace(request))
        online.task = asyncio.create_task(self._drive(online))
        self.live[request_id] = online
        self.tally.seen += 1
        self.tally.total = self.tally.seen        # the dashboard's done/total: of those seen
        return online

    def _check_room(self) -> None:
        if not self.accepting:
            raise ApiError(503, "the server is shutting down", "unavailable")
        try:
            self.cluster.check_engines()
        except EngineFailure as failure:
            raise ApiError(503, str(failure), "engine_failure") from None
        if len(self.live) >= self.max_inflight:
            raise ApiError(429, f"{len(self.live)} requests in flight, the most --max-inflight "
                           "allows; retry shortly", "rate_limit", {"Retry-After": "1"})

    def abort(self, online: OnlineRequest) -> None:
        """The client went away: stop the request (its task frees its pages everywhere)."""
        if online.task is not None and not online.task.done():
            online.task.cancel()

    async def outcome(self, online: OnlineRequest,
                      gone: Callable[[], Awaitable[bool]]) -> Ended | None:
        """Wait for the request's end; None (and the request aborted) if `gone()` says the
        client left first."""
        while True:
            try:
                event = await asyncio.wait_for(online.queue.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await gone():
                    self.abort(online)
                    return None
                continue
            if isinstance(event, Ended):
                return event

    # ---- the request's task ------------------------------------------------------------------
    async def _drive(self, online: OnlineRequest) -> None:
        request, trace = online.request, online.trace
        trace.started = time.monotonic()
        try:
            await asyncio.wait_for(self._route(online), self.request_timeout_s)
            trace.finished = time.monotonic()
            await self.cluster.release_leftovers(request)
            self._count_completed(online)
            online.queue.put_nowait(Ended())
        except asyncio.CancelledError:
            await self._abandon(request, "client_gone")
        except asyncio.TimeoutError:
            await self._abandon(request, "timeout")
            online.queue.put_nowait(Ended(ApiError(
                504, f"router {self.router_name} did not finish within --request-timeout "
                f"{self.request_timeout_s:g} s; the request was aborted", "request_timeout")))
        except EngineFailure as failure:
            self._count_failed(str(failure))
            online.queue.put_nowait(Ended(ApiError(503, str(failure), "engine_failure")))
        except Exception as exc:
            await self.cluster.release_leftovers(request)
            self._count_failed(f"{type(exc).__name__}: {exc}")
            online.queue.put_nowait(Ended(ApiError(
                500, f"router {self.router_name} failed: {type(exc).__name__}: {exc}\n"
                f"{traceback.format_exc()}", "router_error")))
        finally:
            self.live.pop(request.id, None)
            self.cluster.pop_trace(request)

    async def _route(self, online: OnlineRequest) -> None:
        async for _ in routed_tokens(self.route, online.request, self.cluster,
                                     self.limits.vocab_size):
            online.queue.put_nowait(PROGRESS)

    async def _abandon(self, request: Request, outcome: str) -> None:
        await self.cluster.abort_everywhere(request)
        await self.cluster.release_leftovers(request)
        self.outcomes[outcome] += 1
        self.tally.abandoned += 1

    def _count_completed(self, online: OnlineRequest) -> None:
        metrics = online.trace.metrics(self.router_name)
        self.histograms["mpiserve_ttft_seconds"].observe(metrics["ttft"])
        self.histograms["mpiserve_tpot_seconds"].observe(metrics["tpot"])
        self.outcomes["completed"] += 1
        self.tally.completed += 1
        self.tally.generated_tokens += sum(len(s.tokens) for s in online.samples())
        self.tally.latencies.append(metrics)

    def _count_failed(self, message: str) -> None:
        self.outcomes["failed"] += 1
        self.tally.failed += 1
        self.tally.errors.append(message.splitlines()[0])

    # ---- answers ------------------------------------------------------------------------------
    def whole_body(self, online: OnlineRequest) -> dict:
        """The completion object of a finished request (not streamed)."""
        made = choices(online.item, online.request.prompt, online.samples(),
                       online.trace.prompt_logprobs, self.tokenizer)
        return completion_body(online.item, online.request.id, made, len(online.request.prompt),
                               online.trace.metrics(self.router_name), self.limits.name)

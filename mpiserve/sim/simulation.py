"""One simulated run: requests arrive at their times, a router serves them through the real
Cluster and EngineHandle API, simulated engines compute on a virtual clock. Returns one output
record per request, shaped as `mpiserve run` writes them (the fields bench.metrics reads)."""

from __future__ import annotations

import asyncio
import gc
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..cluster.layout import JobLayout
from ..cluster.messages import Request
from ..engine.sampling_params import SamplingParams
from ..router import clock
from ..router.cluster import Cluster
from ..router.dispatcher import EngineFailure
from ..router.route_contract import routed_tokens
from .sim_dispatcher import SimDispatcher
from .sim_engine import SimEngine, SimEngineConfig
from .virtual_loop import VirtualClockLoop

YOUNG_GC_THRESHOLD = 20_000    # allocations between collections of the youngest generation
                               # (Python's default: 700)


@dataclass(frozen=True)
class SimRequest:
    custom_id: str
    prompt: list[int]
    params: SamplingParams
    arrival_s: float = 0.0


@dataclass(frozen=True)
class SimLayout:
    prefill: int
    decode: int
    tp: int = 1

    def job(self) -> JobLayout:
        layout = JobLayout(0, self.prefill, self.decode, self.tp, self.tp)
        layout = JobLayout(layout.needed_ranks, self.prefill, self.decode, self.tp, self.tp)
        problem = layout.problem()
        if problem:
            raise ValueError(problem)
        return layout


@dataclass
class SimResult:
    records: list[dict]
    engine_stats: dict[int, dict]       # each engine's last stats, by lead rank
    virtual_s: float                    # simulated seconds from 0 to the last completion
    strategies: dict[str, int]
    failed_transfers: list[str]
    failure: str | None = None          # why the engines stopped (requests left get errors)


def simulate(requests: list[SimRequest], route, router_name: str, layout: SimLayout, cost,
             config: SimEngineConfig, router_args: dict | None = None,
             max_inflight: int = 256) -> SimResult:
    """Serve `requests` (in order, each no earlier than its arrival_s) with `route`."""
    loop = VirtualClockLoop()
    try:
        with clock.using(loop.time), _collecting_new_objects_only():
            return loop.run_until_complete(_simulate(requests, route, router_name, layout, cost,
                                                     config, router_args or {}, max_inflight))
    finally:
        loop.close()


@contextmanager
def _collecting_new_objects_only() -> Iterator[None]:
    """Python's cyclic garbage collector, during a simulation, leaves alone what existed
    before it (an earlier simulation's records, say: its full collections would scan them
    again and again) and runs its youngest generation less often (a simulation makes and drops
    several objects per token)."""
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(YOUNG_GC_THRESHOLD, *thresholds[1:])
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


async def _simulate(requests, route, router_name, layout, cost, config, router_args,
                    max_inflight) -> SimResult:
    dispatcher = SimDispatcher(config.control_latency_s)
    groups = layout.job().groups
    for g in groups:
        dispatcher.engines[g.lead] = SimEngine(g.lead, g.role, g.size, config, cost, dispatcher)
    _share_hosts(list(dispatcher.engines.values()), config.engines_per_host)
    cluster = Cluster(dispatcher, {g.lead: g.role for g in groups}, config.page_size,
                      router_args, tp={g.lead: g.size for g in groups})
    for engine in dispatcher.engines.values():
        engine.start()
    asyncio.get_running_loop().on_stall = lambda: dispatcher.fail(EngineFailure(
        "the simulated engines are stuck: nothing can run and no event is left\n"
        + "\n".join(e.describe() for e in dispatcher.engines.values())))
    served = _Served(cluster, route, router_name, config.vocab_size)
    try:
        await served.admit(requests, max_inflight)
    finally:
        for engine in dispatcher.engines.values():
            engine.stop()
    failure = None if dispatcher.failure is None else str(dispatcher.failure)
    return SimResult(served.records, dict(dispatcher.stats), served.last_finish,
                     dict(cluster.strategies), list(cluster.failed_transfers), failure)


def _share_hosts(engines: list[SimEngine], per_host: int) -> None:
    """Engines in rank order, `per_host` to a host: each slows the others' steps."""
    for first in range(0, len(engines), per_host):
        host = engines[first:first + per_host]
        for engine in host:
            engine.host_peers = [peer for peer in host if peer is not engine]


class _Served:
    """Admission and one output record per request, as router.batch_runner does it."""

    def __init__(self, cluster: Cluster, route, router_name: str, vocab_size: int):
        self.cluster, self.route, self.router_name = cluster, route, router_name
        self.vocab_size = vocab_size
        self.records: list[dict] = []
        self.last_finish = 0.0

    async def admit(self, requests: list[SimRequest], max_inflight: int) -> None:
        loop = asyncio.get_running_loop()
        slots = asyncio.Semaphore(max_inflight)
        tasks = []
        failed = asyncio.ensure_future(self.cluster.engine_failed())
        for item in requests:
            await asyncio.sleep(max(0.0, item.arrival_s - loop.time()))
            request = Request(item.custom_id, list(item.prompt), item.params)
            self.cluster.trace(request).arrival = max(item.arrival_s, loop.time())
            take = asyncio.ensure_future(slots.acquire())
            await asyncio.wait({take, failed}, return_when=asyncio.FIRST_COMPLETED)
            if failed.done():
                take.cancel()
                break
            task = asyncio.create_task(self._serve(request))
            task.add_done_callback(lambda _: slots.release())
            tasks.append(task)
        await asyncio.wait({asyncio.gather(*tasks, return_exceptions=True), failed},
                           return_when=asyncio.FIRST_COMPLETED)
        failed.cancel()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._unserved(requests)

    def _unserved(self, requests: list[SimRequest]) -> None:
        """An error record for each request the engines' failure left without one."""
        failure = self.cluster._dispatcher.failure
        answered = {r["custom_id"] for r in self.records}
        for item in requests:
            if item.custom_id not in answered:
                request = Request(item.custom_id, list(item.prompt), item.params)
                self.records.append(error(request, f"not served: {failure}", "engine_failure"))

    async def _serve(self, request: Request) -> None:
        cluster = self.cluster
        trace = cluster.trace(request)
        trace.started = clock.now()
        try:
            generated = 0                 # (a simulated token's id says nothing: only counted)
            async for chunk in routed_tokens(self.route, request, cluster, self.vocab_size):
                generated += len(chunk)
            trace.finished = clock.now()
            await cluster.release_leftovers(request)
            metrics = cluster.pop_trace(request).metrics(self.router_name, itl=True)
            self.records.append(completion(request, generated, metrics))
            self.last_finish = max(self.last_finish, trace.finished)
        except EngineFailure:
            raise
        except Exception as exc:
            await cluster.release_leftovers(request)
            cluster.pop_trace(request)
            self.records.append(error(request, f"router {self.router_name} failed on "
                                      f"{request.id!r}: {type(exc).__name__}: {exc}\n"
                                      f"{traceback.format_exc()}"))


def completion(request: Request, generated: int, metrics: dict) -> dict:
    prompt = len(request.prompt)
    return {"custom_id": request.id, "error": None,
            "response": {"status_code": 200, "body": {
                "usage": {"prompt_tokens": prompt, "completion_tokens": generated,
                          "total_tokens": prompt + generated},
                "metrics": metrics}}}


def error(request: Request, message: str, code: str = "router_error") -> dict:
    return {"custom_id": request.id, "response": None,
            "error": {"code": code, "message": message}}

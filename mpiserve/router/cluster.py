"""What a router sees: the engine handles, their roles and load, and a few helpers."""

from __future__ import annotations

from collections import Counter

from ..cluster.messages import Request
from .dispatcher import Dispatcher
from .engine_handle import EngineHandle
from .engine_speed import Speed, SpeedEstimator
from .prefix_index import PrefixIndex
from .request_trace import RequestTrace


class Cluster:
    """`engines`, `prefill` and `decode` are lists of EngineHandle; `args` holds the
    `--router-arg key=value` options; `prefixes` estimates which engine holds which prefix."""

    def __init__(self, dispatcher: Dispatcher, roles: dict[int, str], page_size: int,
                 args: dict | None = None, tp: dict[int, int] | None = None):
        """`roles` and `tp` (ranks per engine, default 1) are keyed by engine lead rank."""
        self.engines = [EngineHandle(rank, role, dispatcher, self, (tp or {}).get(rank, 1))
                        for rank, role in sorted(roles.items())]
        self.prefill = [e for e in self.engines if e.role == "prefill"]
        self.decode = [e for e in self.engines if e.role == "decode"]
        self.args = dict(args or {})
        self.page_size = page_size
        self.prefixes = PrefixIndex(page_size)
        self.strategies: Counter[str] = Counter()
        self.failed_transfers: list[str] = []
        self._traces: dict[str, RequestTrace] = {}
        self._reservations: Counter[int] = Counter()    # rank -> traces with it in .reserved
        self._dispatcher = dispatcher
        self._speeds = {e.rank: SpeedEstimator() for e in self.engines}
        self._speed_seen: dict[int, dict] = {}

    def least_loaded(self, engines: list[EngineHandle] | None = None) -> EngineHandle:
        """The engine with the fewest active requests, then the least queued prefill."""
        return min(engines or self.engines, key=_load_order)

    def cached_prefix(self, engine: EngineHandle, request: Request) -> int:
        """Prompt tokens `engine` likely holds already (whole pages; an estimate)."""
        return self.prefixes.matched(engine.rank, request.prompt)

    def note_strategy(self, request: Request, name: str) -> None:
        """Record which strategy a router chose for a request (shown in metrics)."""
        self.trace(request).strategy = name
        self.strategies[name] += 1

    def speed(self, engine: EngineHandle) -> Speed:
        """The engine's measured compute speed: `prefill_rate` and `decode_rate` in tokens per
        second of busy time, from the counters in its stats (None until measured)."""
        stats = self._dispatcher.stats.get(engine.rank)
        if stats is not None and stats is not self._speed_seen.get(engine.rank):
            self._speed_seen[engine.rank] = stats
            self._speeds[engine.rank].observe_stats(stats)
        return self._speeds[engine.rank].speed

    def prefill_rate(self, engine: EngineHandle) -> float | None:
        """Prompt tokens per second the engine prefills when busy (None until measured)."""
        return self.speed(engine).prefill_rate

    def decode_rate(self, engine: EngineHandle) -> float | None:
        """Generated tokens per second the engine decodes when busy (None until measured)."""
        return self.speed(engine).decode_rate

    # ---- used by the runtime and the handles --------------------------------------------------
    def trace(self, request: Request) -> RequestTrace:
        trace = self._traces.get(request.id)
        if trace is None:                    # (not setdefault: no RequestTrace per call)
            trace = self._traces[request.id] = RequestTrace()
        return trace

    @property
    def engine_stats(self) -> dict[int, dict]:
        """Each engine's latest stats snapshot, by lead rank."""
        return self._dispatcher.stats

    def engines_ready(self) -> bool:
        """Whether every engine has loaded its model and reported its stats."""
        return all(e.rank in self._dispatcher.stats for e in self.engines)

    async def engine_failed(self) -> None:
        """Returns once the dispatcher has seen an engine fail."""
        await self._dispatcher.failed.wait()

    def check_engines(self) -> None:
        """Raise the engine failure the dispatcher saw, if any."""
        if self._dispatcher.failure is not None:
            raise self._dispatcher.failure

    def pop_trace(self, request: Request) -> RequestTrace:
        trace = self._traces.pop(request.id, None)
        if trace is None:
            return RequestTrace()
        self._reservations.subtract(trace.reserved)
        return trace

    def reservations_on(self, rank: int) -> int:
        """Requests in flight that hold pages reserved on `rank` and do not generate yet."""
        return self._reservations[rank]

    def set_reserved(self, request: Request, trace: RequestTrace, rank: int,
                     held: bool) -> None:
        """Record in `trace` (the request's) whether `rank` holds prep_recv pages for it. The
        only way to change `trace.reserved`: reservations_on keeps count of it, for the
        traces still in flight, so that a load check costs no scan of every request."""
        if held == (rank in trace.reserved):
            return
        if held:
            trace.reserved.add(rank)
        else:
            trace.reserved.discard(rank)
        if self._traces.get(request.id) is trace:
            self._reservations[rank] += 1 if held else -1

    def count_failed_transfer(self, request: Request, reason: str) -> None:
        self.failed_transfers.append(f"{request.id}: {reason}")

    async def release_leftovers(self, request: Request) -> None:
        """Free pages the router reserved with prep_recv but never generated on (it failed,
        or chose another engine); kept, they would shrink the engine's pool for good."""
        reserved = self.trace(request).reserved
        for engine in [e for e in self.engines if e.rank in reserved]:
            await engine.release(request)

    async def abort_everywhere(self, request: Request) -> None:
        """After a timeout or a client gone: every engine the request touched drops its
        reservation and stops generating it (its pages are freed, no token follows)."""
        touched = self.trace(request).engines
        for engine in [e for e in self.engines if e.rank in touched]:
            await engine.abort(request)


def _load_order(engine: EngineHandle) -> tuple[int, int, int]:
    """least_loaded's order (each engine's load is built once: pd takes two per request)."""
    load = engine.load
    return load.active, load.queued_prefill, engine.rank

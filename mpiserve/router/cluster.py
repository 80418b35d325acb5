"""What a router sees: the engine handles, their roles and load, and a few helpers."""

from __future__ import annotations

from collections import Counter

from ..cluster.messages import Request
from .dispatcher import Dispatcher
from .engine_handle import EngineHandle
from .prefix_index import PrefixIndex
from .request_trace import RequestTrace


class Cluster:
    """`engines`, `prefill` and `decode` are lists of EngineHandle; `args` holds the
    `--router-arg key=value` options; `prefixes` estimates which engine holds which prefix."""

    def __init__(self, dispatcher: Dispatcher, roles: dict[int, str], page_size: int,
                 args: dict | None = None):
        self.engines = [EngineHandle(rank, role, dispatcher, self)
                        for rank, role in sorted(roles.items())]
        self.prefill = [e for e in self.engines if e.role == "prefill"]
        self.decode = [e for e in self.engines if e.role == "decode"]
        self.args = dict(args or {})
        self.page_size = page_size
        self.prefixes = PrefixIndex(page_size)
        self.strategies: Counter[str] = Counter()
        self.failed_transfers: list[str] = []
        self._traces: dict[str, RequestTrace] = {}

    def least_loaded(self, engines: list[EngineHandle] | None = None) -> EngineHandle:
        """The engine with the fewest active requests, then the least queued prefill."""
        pool = engines or self.engines
        return min(pool, key=lambda e: (e.load.active, e.load.queued_prefill, e.rank))

    def cached_prefix(self, engine: EngineHandle, request: Request) -> int:
        """Prompt tokens `engine` likely holds already (whole pages; an estimate)."""
        return self.prefixes.matched(engine.rank, request.prompt)

    def note_strategy(self, request: Request, name: str) -> None:
        """Record which strategy a router chose for a request (shown in metrics)."""
        self.trace(request).strategy = name
        self.strategies[name] += 1

    # ---- used by the runtime and the handles --------------------------------------------------
    def trace(self, request: Request) -> RequestTrace:
        return self._traces.setdefault(request.id, RequestTrace())

    def pop_trace(self, request: Request) -> RequestTrace:
        return self._traces.pop(request.id, None) or RequestTrace()

    def count_failed_transfer(self, request: Request, reason: str) -> None:
        self.failed_transfers.append(f"{request.id}: {reason}")

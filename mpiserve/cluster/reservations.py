"""An engine's `prep_recv` reservations (pure bookkeeping over the engine core): the pages held
for requests whose KV is on its way, by request id, and the calls still waiting for pages, in
arrival order. The engine rank and the simulated engine both keep theirs here; how an answer
reaches the router is theirs to say, through `grant(call, answer, address)` and
`refuse(call, answer, message)` (`answer`: whatever they queued with the call)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from ..engine.engine_core import EngineCore
from ..engine.sequence import Sequence
from ..errors import MpiserveError
from .messages import Call, KVAddress

Grant = Callable[[Call, object, KVAddress], None]
Refuse = Callable[[Call, object, str], None]


class Reservations:
    def __init__(self, core: EngineCore, rank: int, tp: int):
        self.core, self.rank, self.tp = core, rank, tp
        self.held: dict[str, Sequence] = {}              # request id -> seq from prep_recv
        self.waiting: deque[tuple[Call, object]] = deque()

    def prep_recv(self, call: Call, answer, grant: Grant) -> None:
        """Reserve now and grant, or queue the call until pages free up (`retry`)."""
        if not self._try(call, answer, grant):
            self.waiting.append((call, answer))

    def retry(self, grant: Grant, refuse: Refuse) -> bool:
        """Grant the waiting calls that fit now, in order; True if any was answered."""
        progressed = False
        while self.waiting:
            call, answer = self.waiting[0]
            try:
                if not self._try(call, answer, grant):
                    break
            except (MpiserveError, ValueError, IndexError) as exc:
                refuse(call, answer, f"engine rank {self.rank}: {exc}")
            self.waiting.popleft()
            progressed = True
        return progressed

    def release(self, request_id: str) -> None:
        seq = self.held.pop(request_id, None)
        if seq is not None:
            self.core.release(seq)

    def abort(self, request_id: str) -> None:
        """Forget the request: its waiting call (unanswered) and the pages it holds."""
        self.waiting = deque(w for w in self.waiting if w[0].request.id != request_id)
        self.release(request_id)

    def _try(self, call: Call, answer, grant: Grant) -> bool:
        request = call.request
        end = request.resolve(call.args.get("end"), len(request.prompt))
        seq = self.core.reserve(request.id, request.prompt, request.params, end)
        if seq is None:
            return False
        self.release(request.id)
        self.held[request.id] = seq
        grant(call, answer, KVAddress(self.rank, request.id, seq.num_computed, end,
                                      tuple(seq.page_ids), self.tp))
        return True

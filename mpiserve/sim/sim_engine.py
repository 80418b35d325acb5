"""One simulated engine: the real EngineCore (scheduler, page pool, prefix cache, sequences)
answering the three microserving calls, with the forward pass and the KV transfer replaced by
a cost model's durations on the event loop's virtual clock.

It follows the real engine rank's loop (cluster.engine_worker): calls, landed KV pieces and
finished sends are taken between steps; a step schedules, lasts the cost model's time, then
records its chunks and streams the new tokens. A remote_send's KV leaves piece by piece, one
piece per prefill step of the sender, over the sender's link (one piece at a time), and lands
in the receiver's reserved pages when its transfer time has passed.

Engines on one host (SimEngineConfig.engines_per_host) slow each other's steps down, as CPU
engines sharing caches and memory bandwidth do: a step's work is its time alone, done at rate
1 / (1 + n * slowdown) while n neighbours on the host are mid-step (the cost model's
co_run_slowdown), so it ends later when neighbours start steps during it and sooner when they
stop.
"""

from __future__ import annotations

import asyncio
import traceback
from collections import deque
from dataclasses import dataclass, field

from ..cluster.call_checks import send_range
from ..cluster.messages import Call, KVAddress, TransferDone
from ..cluster.reservations import Reservations
from ..cluster.token_updates import Generations
from ..engine.engine_core import EngineCore
from ..engine.page_pool import PagePool
from ..engine.scheduler import Scheduler
from ..engine.sequence import Sequence
from ..engine.step_shape import StepShape
from ..errors import MpiserveError
from ..router.dispatcher import EngineCallError, EngineFailure

SIM_TOKEN = 0          # every simulated token; the simulator knows no eos, so outputs run to
                       # max_tokens (or the context's end)


def _grant(call: Call, future, address: KVAddress) -> None:
    future.set_result(address)


def _refuse(call: Call, future, message: str) -> None:
    future.set_exception(EngineCallError(message))


def _pick_sim_token(seq: Sequence) -> int:
    """The simulated steps' token picker."""
    return SIM_TOKEN


@dataclass(frozen=True)
class SimEngineConfig:
    """What every simulated engine is built with (as EngineConfig for a real one)."""
    page_size: int = 16
    num_pages: int = 4096
    max_num_seqs: int = 64
    max_batch_tokens: int = 1024
    max_model_len: int = 1 << 20
    vocab_size: int = 1 << 20
    stats_interval_s: float = 0.5      # as the real engine's WorkerOptions
    control_latency_s: float = 0.0     # one-way delay of a message between rank 0 and an engine
    engines_per_host: int = 1          # engines that slow each other's steps, in rank order

    def __post_init__(self):
        for name in ("page_size", "num_pages", "max_num_seqs", "max_batch_tokens",
                     "max_model_len", "vocab_size", "engines_per_host"):
            if getattr(self, name) < 1:
                raise MpiserveError(f"simulated engine: {name} must be at least 1")


@dataclass
class SimTransfer:
    """A remote_send's KV of prompt[begin:end], leaving as the sender's prefill computes it."""
    call_id: int
    request_id: str
    seq: Sequence
    receiver: SimEngine
    begin: int
    end: int
    future: asyncio.Future
    sent_upto: int = field(init=False)
    nbytes: int = 0                   # landed in the receiver
    failed: bool = False
    target: Sequence | None = None    # the receiver's reservation when the first piece landed

    def __post_init__(self):
        self.sent_upto = self.begin


@dataclass
class SimStep:
    """A step in progress: `left_s` of its time alone still to do, at 1 / (1 + neighbours *
    slowdown) seconds of it per second since `since`."""
    chunks: list
    began: float
    left_s: float
    slowdown: float = 0.0
    neighbours: int = 0
    since: float = 0.0

    def end(self) -> float:
        return self.since + self.left_s * (1 + self.neighbours * self.slowdown)

    def rerate(self, now: float, neighbours: int) -> None:
        """From `now` on, `neighbours` step beside it."""
        done = (now - self.since) / (1 + self.neighbours * self.slowdown)
        self.left_s, self.since, self.neighbours = max(0.0, self.left_s - done), now, neighbours


@dataclass(frozen=True)
class SimPiece:
    transfer: SimTransfer
    begin: int
    end: int
    nbytes: int

    @property
    def last(self) -> bool:
        return self.end == self.transfer.end


class SimEngine:
    def __init__(self, rank: int, role: str, tp: int, config: SimEngineConfig, cost,
                 dispatcher):
        pool = PagePool(config.num_pages, config.page_size)
        self.core = EngineCore(pool, Scheduler(pool, config.max_num_seqs,
                                               config.max_batch_tokens, config.max_model_len),
                               config.vocab_size, (), config.max_model_len)
        self.rank, self.role, self.tp = rank, role, tp
        self.config, self.cost, self.dispatcher = config, cost, dispatcher
        self.inbox: deque = deque()
        self.reservations = Reservations(self.core, rank, tp)
        self.generations = Generations(self.core)
        self.to_send: dict[int, SimTransfer] = {}        # id(prefill seq) -> its transfer
        self.counters = self.generations.counters
        self.busy_s = 0.0
        self.link_free = 0.0                             # when the outgoing link is idle
        self.host_peers: list[SimEngine] = []            # the other engines on its host
        self.step: SimStep | None = None                 # the step in progress
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: asyncio.Handle | None = None      # the engine's next callback; None: idle
        self._stopped = False
        self._next_stats = 0.0
        self._dirty = True

    # ---- from the dispatcher and other engines ---------------------------------------------
    def receive(self, call: Call, future) -> None:
        self._post(("call", call, future))

    def _post(self, item) -> None:
        self.inbox.append(item)
        if self._pending is None and not self._stopped:
            self._pending = self._loop.call_soon(self._resume, False)

    def fail_pending(self, failure: EngineFailure) -> None:
        calls = [item[2] for item in self.inbox if item[0] == "call"]
        for future in [*calls, *(answer for _, answer in self.reservations.waiting)]:
            if future is not None and not future.done():
                future.set_exception(failure)
        for transfer in self.to_send.values():
            if not transfer.future.done():
                transfer.future.set_exception(failure)

    # ---- the loop ----------------------------------------------------------------------------
    # The engine rank's loop, as callbacks on the virtual clock rather than a task that sleeps:
    # a step is one timer, and an idle engine is woken by the next thing posted to it.
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._pending = self._loop.call_soon(self._resume, False, True)

    def stop(self) -> None:
        self._stopped = True
        if self._pending is not None:
            self._pending.cancel()
            self._pending = None

    def _resume(self, step_ended: bool, first: bool = False) -> None:
        """From one wait to the next: finish the step that ended (if any), take calls, landed
        KV and finished sends, then start the next step, or go idle."""
        try:
            if step_ended:
                self._finish_step()
            self._report_stats(force=first)
            self._handle_inbox()
            self.reservations.retry(_grant, _refuse)
            chunks = self.core.scheduler.schedule()
            if not chunks:                       # nothing to do, or pages are short
                self._report_stats(force=self._dirty)
                self._pending = None
                return
            self._begin_step(chunks)
        except Exception:
            self._pending = None
            self._stopped = True
            self.dispatcher.fail(EngineFailure(
                f"simulated engine rank {self.rank} failed:\n{traceback.format_exc()}"))

    def _handle_inbox(self) -> None:
        while self.inbox:
            kind, *rest = self.inbox.popleft()
            self._dirty = True
            if kind == "call":
                self._call(*rest)
            elif kind == "landed":
                self._landed(*rest)
            else:                                            # "sent"
                self._sent(*rest)

    def _call(self, call: Call, future) -> None:
        try:
            getattr(self, "_" + call.method)(call, future)
        except (MpiserveError, ValueError, IndexError) as exc:
            error = EngineCallError(f"engine rank {self.rank}: {exc}")
            if future is None:
                self.dispatcher.stream_failed(call.call_id, error)
            elif not future.done():
                future.set_exception(error)

    def _begin_step(self, chunks) -> None:
        shape, now = StepShape.of(chunks), self._loop.time()
        self.step = SimStep(chunks, now, self.cost.step_time(shape, self.tp), since=now)
        if self.host_peers:
            self.step.slowdown = self.cost.co_run_slowdown(shape)
            self.step.neighbours = sum(peer.step is not None for peer in self.host_peers)
            self._tell_peers()
        self._pending = self._loop.call_at(self.step.end(), self._resume, True)

    def _tell_peers(self) -> None:
        """This engine began or ended a step: its neighbours' steps change pace."""
        now = self._loop.time()
        for peer in self.host_peers:
            peer._neighbours_changed(now)

    def _neighbours_changed(self, now: float) -> None:
        step = self.step
        if step is None or self._stopped:
            return
        neighbours = sum(peer.step is not None for peer in self.host_peers)
        if neighbours == step.neighbours:
            return
        step.rerate(now, neighbours)
        self._pending.cancel()
        self._pending = self._loop.call_at(step.end(), self._resume, True)

    def _finish_step(self) -> None:
        """The step's time has passed: record its chunks, send KV, stream the new tokens."""
        chunks, began, self.step = self.step.chunks, self.step.began, None
        self.busy_s += self._loop.time() - began
        if self.host_peers:
            self._tell_peers()
        events = []
        for chunk in chunks:
            events.extend(self.core.chunk_computed(chunk, _pick_sim_token))
        if self.to_send:                          # only a sender has KV or prefills to see off
            self._send_pieces(chunks)
            events = [e for e in events if not self._sent_off(e.seq)]
        self.dispatcher.deliver(self.generations.updates(events))
        self._dirty = True

    # ---- prep_recv, release, abort -----------------------------------------------------------
    def _prep_recv(self, call: Call, future) -> None:
        self.reservations.prep_recv(call, future, _grant)

    def _release(self, call: Call, future) -> None:
        self.reservations.release(call.request.id)
        future.set_result(None)

    def _abort(self, call: Call, future) -> None:
        request_id = call.request.id
        self.reservations.abort(request_id)
        ended = self.generations.abort(request_id)
        if ended is not None:
            self.dispatcher.deliver([ended])
        future.set_result(None)

    # ---- start_generate ---------------------------------------------------------------------
    def _start_generate(self, call: Call, future) -> None:
        self.generations.start(call, self.reservations.held.pop(call.request.id, None))

    # ---- remote_send: the sender ------------------------------------------------------------
    def _remote_send(self, call: Call, future) -> None:
        request, kv = call.request, call.args["kv"]
        begin, end = send_range(request, kv, call.args.get("begin"), call.args.get("end"),
                                self.rank)
        if begin == end:
            future.set_result(TransferDone(call.call_id, True, 0))
            return
        receiver = self.dispatcher.engines[kv.rank]
        seq = self.core.prefill_for_send(f"{request.id}/send{call.call_id}",
                                         request.prompt[:end])
        self.to_send[id(seq)] = SimTransfer(call.call_id, request.id, seq, receiver, begin,
                                            end, future)

    def _send_pieces(self, chunks) -> None:
        """After a step: the KV its prefill chunks computed for transfers goes on the link."""
        loop = self._loop
        for chunk in chunks:
            t = self.to_send.get(id(chunk.seq))
            end = min(chunk.end, t.end) if t is not None else 0
            if t is None or end <= t.sent_upto:
                continue
            piece = SimPiece(t, t.sent_upto, end,
                             (end - t.sent_upto) * self.cost.kv_bytes_per_token)
            t.sent_upto = end
            start = max(loop.time(), self.link_free)
            self.link_free = start + self.cost.kv_transfer_time(piece.nbytes, self.tp,
                                                                t.receiver.tp)
            loop.call_at(self.link_free, t.receiver._post, ("landed", piece))
            if piece.last:
                loop.call_at(self.link_free, self._post, ("sent", t))

    def _sent_off(self, seq: Sequence) -> bool:
        """A remote_send's prefill is done: its pages stay until its last piece is sent."""
        if not seq.prefill_only:
            return False
        self.to_send.pop(id(seq))
        return True

    def _sent(self, t: SimTransfer) -> None:
        self.core.release(t.seq)
        self.counters["kv_bytes_sent"] += (t.end - t.begin) * self.cost.kv_bytes_per_token

    # ---- remote_send: the receiver ----------------------------------------------------------
    def _landed(self, piece: SimPiece) -> None:
        t = piece.transfer
        if t.failed:
            return
        if t.target is None:
            t.target = self.reservations.held.get(t.request_id)
        if t.target is None or self.reservations.held.get(t.request_id) is not t.target:
            self._fail_transfer(t, "no reservation (prep_recv first)" if t.target is None
                                else "request already started")
            return
        self.core.kv_received(t.target, piece.end)
        t.nbytes += piece.nbytes
        self.counters["kv_bytes_received"] += piece.nbytes
        if piece.last and not t.future.done():
            t.future.set_result(TransferDone(t.call_id, True, t.nbytes))

    def _fail_transfer(self, t: SimTransfer, reason: str) -> None:
        t.failed = True
        target = self.reservations.held.get(t.request_id)
        if target is not None and target is t.target:
            self.core.drop_reserved_tail(target)
        self.counters["transfers_failed"] += 1
        if not t.future.done():
            t.future.set_result(TransferDone(t.call_id, False, t.nbytes,
                                             f"rank {self.rank}: {reason}"))

    def describe(self) -> str:
        """One line on what the engine holds, for a stuck simulation's message."""
        scheduler, pool = self.core.scheduler, self.core.pool
        return (f"engine rank {self.rank} ({self.role}): {len(scheduler.running)} running, "
                f"{len(scheduler.waiting)} waiting, {len(self.reservations.held)} reservations "
                f"held and {len(self.reservations.waiting)} waiting for pages, "
                f"{pool.num_available}/{pool.num_pages} pages available")

    # ---- stats ------------------------------------------------------------------------------
    def _report_stats(self, force: bool = False) -> None:
        now = self._loop.time()
        if not force and now < self._next_stats:
            return
        self._next_stats = now + self.config.stats_interval_s
        self._dirty = False
        self.dispatcher.report(self.rank, self.stats(now))

    def stats(self, now: float) -> dict:
        return {"role": self.role, "host": "simulated", "busy_s": self.busy_s, "tp": self.tp,
                **self.core.bookkeeping_stats(), **self.counters, "time": now,
                "simulated": True}

"""The loop every engine rank runs: answer the three microserving calls, step the engine,
stream tokens to the router and move KV pages to and from other engines."""

from __future__ import annotations

import socket
import time
import traceback
from dataclasses import dataclass

from ..engine.engine import Engine
from ..engine.sequence import Sequence
from ..engine.step_shape import StepShape
from ..engine.step_timings import StepTimings
from ..errors import MpiserveError
from .backoff import Backoff
from .call_checks import send_range
from .control import ControlChannel
from .kv_transfer import (
    IncomingCall,
    IncomingStep,
    KVStream,
    OutgoingTransfer,
    WorkWaiter,
    joined,
    post_receives,
    send_layer,
)
from .layout import ROUTER_RANK
from .messages import (
    Call,
    Fatal,
    KVAbandon,
    KVAddress,
    KVAnnounce,
    KVPiece,
    Reply,
    Shutdown,
    StatsSnapshot,
    TokenBatch,
    TransferDone,
)
from .reservations import Reservations
from .step_plans import ReceivePlan, WritePlan
from .token_updates import Generations


@dataclass(frozen=True)
class WorkerOptions:
    transfer_timeout_s: float = 60.0
    stats_interval_s: float = 0.5
    fail_transfers: int = 0          # testing: the first N remote_send calls fail on purpose


def report_fatal(control: ControlChannel, exc: BaseException, where: str = "") -> None:
    """Tell the router this rank died, with the traceback (delivery waited on, bounded);
    `where` says which engine it belongs to when that is not the rank itself."""
    control.send(ROUTER_RANK, Fatal(control.rank,
                                    where + "".join(traceback.format_exception(exc))))
    control.flush(timeout=5.0)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


class EngineWorker:
    def __init__(self, comm, engine: Engine, role: str, options: WorkerOptions = WorkerOptions()):
        self.rank = comm.Get_rank()
        self.role = role
        self.control = ControlChannel(comm)
        self.engine = engine
        self.options = options
        self.fail_budget = options.fail_transfers
        self.generations = Generations(engine)
        self.reservations = Reservations(engine, self.rank, engine.tp_size)
        self.to_send: dict[int, OutgoingTransfer] = {}   # id(prefill seq) -> its transfer
        self.sending: list[OutgoingTransfer] = []
        self.incoming: list[IncomingStep] = []              # in announcement order
        self.receiving: dict[int, IncomingCall] = {}        # remote_send call id -> progress
        self.counters = self.generations.counters
        self.stopping = False
        self._next_key = 0                               # names announcements to followers
        self.host = socket.gethostname()
        self.busy_s = 0.0                                # time spent in engine steps
        self.step_timings = StepTimings(StepShape._fields)
        self._step_shape: StepShape | None = None        # the running step's, once scheduled
        self._next_stats = 0.0

    # ---- main loop --------------------------------------------------------------------------
    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            busy = self._handle_messages()
            busy |= self.reservations.retry(self._grant, self._refuse)
            busy |= self._poll_transfers()
            if self.engine.has_work:
                self._timed_step()
                busy = True
            self._report_stats()
            if busy or self.control.wait(backoff.next_delay()):
                backoff.reset()       # busy, or rung: a message is on its way, look soon
        self._finish_sends()

    def _handle_messages(self) -> bool:
        messages = self.control.receive_all()
        for source, message in messages:
            if isinstance(message, Call):
                self._call(message)
            elif isinstance(message, KVAnnounce):
                self._announced(source, message)
            elif isinstance(message, KVAbandon):
                self._abandoned(message)
            elif isinstance(message, Shutdown):
                self.stopping = True
        return bool(messages)

    def _call(self, call: Call) -> None:
        try:
            getattr(self, "_" + call.method)(call)
        except (MpiserveError, ValueError, IndexError) as exc:
            self._reply(Reply(call.call_id, error=f"engine rank {self.rank}: {exc}"))

    def _reply(self, message) -> None:
        self.control.send(ROUTER_RANK, message)

    # ---- prep_recv ----------------------------------------------------------------------------
    def _prep_recv(self, call: Call) -> None:
        self.reservations.prep_recv(call, None, self._grant)

    def _grant(self, call: Call, _, address: KVAddress) -> None:
        self._reply(Reply(call.call_id, address))

    def _refuse(self, call: Call, _, message: str) -> None:
        self._reply(Reply(call.call_id, error=message))

    def _release(self, call: Call) -> None:
        self.reservations.release(call.request.id)
        self._reply(Reply(call.call_id))

    # ---- remote_send --------------------------------------------------------------------------
    def _remote_send(self, call: Call) -> None:
        request, kv = call.request, call.args["kv"]
        begin, end = send_range(request, kv, call.args.get("begin"), call.args.get("end"),
                                self.rank)
        if begin == end:
            self._reply(TransferDone(call.call_id, True, 0))
            return
        if self.fail_budget > 0:
            self.fail_budget -= 1
            self._abandon(call, kv, begin, end, "injected transfer failure")
            return
        try:
            seq = self.engine.prefill_for_send(f"{request.id}/send{call.call_id}",
                                               request.prompt[:end])
        except MpiserveError as exc:
            self._abandon(call, kv, begin, end, str(exc))
            return
        self.to_send[id(seq)] = OutgoingTransfer(call.call_id, request.id, seq, kv.rank,
                                                 begin, end, dest_tp=kv.tp)

    def _abandon(self, call: Call, kv: KVAddress, begin: int, end: int, reason: str) -> None:
        """Tell the receiver no data will come, so it falls back to recomputing."""
        self.control.send(kv.rank, KVAbandon(call.call_id, call.request.id,
                                             f"rank {self.rank}: {reason}"))

    def _layer_hook(self, chunks):
        """Before the forward pass: announce, per receiver, the pieces of the transfers whose
        prefill advances in this step; after each layer: send that layer of every piece, so the
        KV streams while the remaining layers and the next prefill steps compute."""
        self._step_shape = StepShape.of(chunks)
        kv = self.engine.kv
        by_dest: dict[int, list] = {}
        for chunk in chunks:
            t = self.to_send.get(id(chunk.seq))
            end = min(chunk.end, t.end) if t is not None else 0
            if t is None or end <= t.sent_upto:
                continue
            piece = KVPiece(t.call_id, t.request_id, t.sent_upto, end, last=end == t.end)
            by_dest.setdefault(t.dest, []).append((t, piece, kv.slots(t.seq.page_ids,
                                                                      t.sent_upto, end)))
            t.sent_upto = end
        if not by_dest:
            return None
        engine = self.engine
        for dest, pieces in by_dest.items():
            self.control.send(dest, KVAnnounce(tuple(p for _, p, _ in pieces),
                                               self._token_shape(),
                                               dtype_name(engine.dtype), kv.num_layers,
                                               engine.tp_size))
        owners = list(by_dest.values())
        streams = tuple(KVStream(dest, pieces[0][0].dest_tp, tuple(s for _, _, s in pieces))
                        for dest, pieces in by_dest.items())

        def send(layer: int) -> None:                    # layer-major, as announced
            for s, p, buffer, work in send_layer(kv, layer, streams, engine.model.tp.shard,
                                                 engine.model_config.num_kv_heads):
                owners[s][p][0].sent(buffer, work)
        send.streams = streams          # the group's other ranks send their heads' share
        return send

    def _token_shape(self) -> tuple[int, int]:
        """[KV heads, head dim] of the whole model (a TP engine's ranks hold parts)."""
        config = self.engine.model_config
        return config.num_kv_heads, config.head_dim

    # ---- receiving ----------------------------------------------------------------------------
    def _announced(self, source: int, announce: KVAnnounce) -> None:
        engine = self.engine
        buffers, works = post_receives(source, announce, engine.device, engine.model.tp.shard)
        key = self._next_key = self._next_key + 1
        if engine.plans is not None:                     # the other ranks receive their heads
            engine.plans.publish(ReceivePlan(key, source, announce))
        for piece in announce.pieces:
            call = self._incoming_call(piece.call_id, piece.request_id)
            problem = None if call.failed else self._piece_problem(announce, piece, call)
            call.expected = piece.end
            if problem:
                self._fail_call(piece.call_id, piece.request_id, problem)
        waiter = WorkWaiter(works, self.options.transfer_timeout_s)
        followers = len(engine.plans.followers) if engine.plans is not None else 0
        self.incoming.append(IncomingStep(source, announce, buffers, waiter, key, followers))

    def _abandoned(self, message: KVAbandon) -> None:
        self._incoming_call(message.call_id, message.request_id)
        self._fail_call(message.call_id, message.request_id, message.reason)
        del self.receiving[message.call_id]

    def _incoming_call(self, call_id: int, request_id: str) -> IncomingCall:
        if call_id not in self.receiving:
            self.receiving[call_id] = IncomingCall(self.reservations.held.get(request_id))
        return self.receiving[call_id]

    def _piece_problem(self, a: KVAnnounce, piece: KVPiece, call: IncomingCall) -> str | None:
        kv, target = self.engine.kv, call.target
        if target is None:
            return f"no reservation for request {piece.request_id!r} (prep_recv first)"
        follows = piece.begin == call.expected if call.expected is not None \
            else piece.begin <= target.num_computed
        if piece.end > len(target.page_ids) * kv.page_size or not follows:
            return (f"[{piece.begin}, {piece.end}) does not continue the {target.num_computed} "
                    f"tokens held within the reserved {len(target.page_ids)} pages")
        mine = (self._token_shape(), kv.num_layers, dtype_name(self.engine.dtype))
        if (tuple(a.token_shape), a.num_layers, a.dtype) != mine:
            return (f"size mismatch: got {a.num_layers} layers of {tuple(a.token_shape)} "
                    f"{a.dtype} per token, expected {mine[1]} layers of {mine[0]} {mine[2]}")
        return None

    def _fail_call(self, call_id: int, request_id: str, reason: str) -> None:
        """Report a failed transfer once; the receiver keeps what landed and recomputes the rest."""
        call = self.receiving[call_id]
        if call.failed:
            return
        call.failed = True
        if call.target is not None and self.reservations.held.get(request_id) is call.target:
            self.engine.drop_reserved_tail(call.target)
        self.counters["transfers_failed"] += 1
        self._reply(TransferDone(call_id, False, call.nbytes, reason))

    def _poll_transfers(self) -> bool:
        """Land finished steps (on every rank of the group), each sender's in order; free the
        pages of finished sends."""
        plans = self.engine.plans
        progressed, waiting_sources = False, set()
        for landed in plans.landed() if plans is not None else ():
            step = next(s for s in self.incoming if s.key == landed.key)
            step.answered(landed.error)
        for step in list(self.incoming):
            if step.source in waiting_sources or not step.complete:
                waiting_sources.add(step.source)
                continue
            self.incoming.remove(step)
            writes = tuple(self._landed(piece, buffers, step.error)
                           for piece, buffers in zip(step.announce.pieces, step.buffers))
            if plans is not None:                # before any step that reads this KV
                plans.publish(WritePlan(step.key, writes))
            progressed = True
        for t in [t for t in self.sending if t.waiter.finished]:
            self.sending.remove(t)
            self.engine.release(t.seq)
            self.counters["kv_bytes_sent"] += self._kv_bytes(t.end - t.begin)
            progressed = True
        return progressed

    def _kv_bytes(self, tokens: int) -> int:
        """Bytes of the KV of `tokens` positions over all layers and heads (all ranks)."""
        heads, dim = self._token_shape()
        return (2 * tokens * heads * dim * self.engine.kv.num_layers
                * self.engine.kv.layers[0].element_size())

    def _landed(self, piece: KVPiece, buffers: list, error: str | None):
        """Write a landed piece (or fail its call); returns what the group's other ranks write:
        (offset into the piece, slots), or None."""
        call, write = self.receiving[piece.call_id], None
        if not call.failed:
            if error or self.reservations.held.get(piece.request_id) is not call.target:
                self._fail_call(piece.call_id, piece.request_id,
                                error or "request already started")
            else:
                write = self._write_piece(call.target, piece, buffers)
                call.nbytes += self._kv_bytes(piece.end - piece.begin)
                self.counters["kv_bytes_received"] += self._kv_bytes(piece.end - piece.begin)
                if piece.last:
                    self._reply(TransferDone(piece.call_id, True, call.nbytes))
        if piece.last:
            del self.receiving[piece.call_id]
        return write

    def _write_piece(self, target: Sequence, piece: KVPiece, buffers: list):
        start = max(piece.begin, target.num_computed)     # never rewrite prefix-cache pages
        write = None
        if start < piece.end:
            slots = self.engine.kv.slots(target.page_ids, start, piece.end)
            for layer, routes in enumerate(buffers):
                self.engine.kv.write(layer, slots, joined(routes)[:, start - piece.begin:])
            write = (start - piece.begin, slots.cpu())
        self.engine.kv_received(target, piece.end)
        return write

    # ---- start_generate -----------------------------------------------------------------------
    def _start_generate(self, call: Call) -> None:
        self.generations.start(call, self.reservations.held.pop(call.request.id, None))

    # ---- abort (a request timed out on rank 0) ------------------------------------------------
    def _abort(self, call: Call) -> None:
        """Forget a request: its waiting or granted reservation, and its generation (pages
        freed; the stream ends with finish_reason "abort" and no further token)."""
        request_id = call.request.id
        self.reservations.abort(request_id)
        ended = self.generations.abort(request_id)
        if ended is not None:
            self._reply(TokenBatch([ended]))
        self._reply(Reply(call.call_id))

    def _timed_step(self) -> None:
        self._step_shape = None
        started = time.monotonic()
        self._step()
        seconds = time.monotonic() - started
        self.busy_s += seconds
        if self._step_shape is not None:                 # None: nothing was scheduled
            self.step_timings.add(self._step_shape, seconds)

    def _step(self) -> None:
        events = [e for e in self.engine.step(self._layer_hook) if not self._sent_off(e.seq)]
        updates = self.generations.updates(events)
        if updates:
            self._reply(TokenBatch(updates))

    def _sent_off(self, seq: Sequence) -> bool:
        """A remote_send's prefill is done: its KV goes out (the transfer waits for the
        receiver's answer)."""
        if not seq.prefill_only:
            return False
        transfer = self.to_send.pop(id(seq))
        transfer.start_waiting(self.options.transfer_timeout_s)
        self.sending.append(transfer)
        return True

    # ---- stats and exit -----------------------------------------------------------------------
    def _report_stats(self) -> None:
        now = time.monotonic()
        if now < self._next_stats:
            return
        self._next_stats = now + self.options.stats_interval_s
        self._reply(StatsSnapshot(self.rank, self.stats()))

    def stats(self) -> dict:
        engine = self.engine
        return {"role": self.role, "host": self.host, "busy_s": self.busy_s,
                "tp": engine.tp_size, "weight_bytes_per_rank": engine.model.weight_bytes,
                **engine.bookkeeping_stats(), **self.counters, "time": time.time()}

    def _finish_sends(self) -> None:
        deadline = time.monotonic() + self.options.transfer_timeout_s
        while self.sending and time.monotonic() < deadline:
            self._poll_transfers()
            time.sleep(0.005)

    def report_final(self, heartbeats_sent: int = 0) -> None:
        """The engine's last control message (after `run`): its final stats, with the number
        of heartbeats rank 0 must receive before it can finalize MPI."""
        self._reply(StatsSnapshot(self.rank, {**self.stats(), "final": True,
                                              "heartbeats_sent": heartbeats_sent,
                                              "step_timings": self.step_timings.to_json()}))
        self.control.flush()

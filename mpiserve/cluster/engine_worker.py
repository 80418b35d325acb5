"""The loop every engine rank runs: answer the three microserving calls, step the engine,
stream tokens to the router and move KV pages to and from other engines."""

from __future__ import annotations

import socket
import time
import traceback
from collections import deque
from dataclasses import dataclass

from ..engine import Engine
from ..errors import MpiserveError
from ..sequence import Sequence
from .backoff import Backoff
from .control import ControlChannel
from .kv_transfer import IncomingTransfer, OutgoingTransfer, WorkWaiter, post_receives
from .layout import ROUTER_RANK
from .messages import (Call, Fatal, KVAddress, KVAnnounce, Reply, Shutdown, StatsSnapshot,
                       TokenBatch, TokenUpdate, TransferDone)


@dataclass(frozen=True)
class WorkerOptions:
    transfer_timeout_s: float = 60.0
    stats_interval_s: float = 0.5
    fail_transfers: int = 0          # testing: the first N remote_send calls fail on purpose


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
        self.generating: dict[int, int] = {}            # id(seq) -> start_generate call id
        self.reservations: dict[str, Sequence] = {}      # request id -> seq from prep_recv
        self.waiting_reservations: deque[Call] = deque()
        self.to_send: dict[int, OutgoingTransfer] = {}   # id(prefill seq) -> its transfer
        self.sending: list[OutgoingTransfer] = []
        self.incoming: list[IncomingTransfer] = []
        self.counters = {"kv_bytes_sent": 0, "kv_bytes_received": 0, "transfers_failed": 0,
                         "fallbacks": 0, "requests_done": 0}
        self.stopping = False
        self.host = socket.gethostname()
        self.busy_s = 0.0                                # time spent in engine steps
        self._next_stats = 0.0

    # ---- main loop --------------------------------------------------------------------------
    def run(self) -> None:
        backoff = Backoff()
        while not self.stopping:
            busy = self._handle_messages()
            busy |= self._retry_reservations()
            busy |= self._poll_transfers()
            if self.engine.has_work:
                started = time.monotonic()
                self._step()
                self.busy_s += time.monotonic() - started
                busy = True
            self._report_stats()
            if busy:
                backoff.reset()
            else:
                backoff.sleep()
        self._finish_sends()

    def fail(self, exc: BaseException) -> None:
        """Tell the router this rank died, with the traceback."""
        text = "".join(traceback.format_exception(exc))
        self.control.send(ROUTER_RANK, Fatal(self.rank, text))
        self.control.flush(timeout=5.0)

    def _handle_messages(self) -> bool:
        messages = self.control.receive_all()
        for source, message in messages:
            if isinstance(message, Call):
                self._call(message)
            elif isinstance(message, KVAnnounce):
                self._announced(source, message)
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
        if not self._try_reserve(call):
            self.waiting_reservations.append(call)

    def _try_reserve(self, call: Call) -> bool:
        request = call.request
        end = request.resolve(call.args.get("end"), len(request.prompt))
        seq = self.engine.reserve(request.id, request.prompt, request.params, end)
        if seq is None:
            return False
        self._drop_reservation(request.id)
        self.reservations[request.id] = seq
        self._reply(Reply(call.call_id, KVAddress(self.rank, request.id, seq.num_computed, end,
                                                  tuple(seq.page_ids))))
        return True

    def _retry_reservations(self) -> bool:
        progressed = False
        while self.waiting_reservations:
            call = self.waiting_reservations[0]
            try:
                if not self._try_reserve(call):
                    break
            except (MpiserveError, ValueError, IndexError) as exc:
                self._reply(Reply(call.call_id, error=f"engine rank {self.rank}: {exc}"))
            self.waiting_reservations.popleft()
            progressed = True
        return progressed

    def _release(self, call: Call) -> None:
        self._drop_reservation(call.request.id)
        self._reply(Reply(call.call_id))

    def _drop_reservation(self, request_id: str) -> None:
        seq = self.reservations.pop(request_id, None)
        if seq is not None:
            self.engine.release(seq)

    # ---- remote_send --------------------------------------------------------------------------
    def _remote_send(self, call: Call) -> None:
        request, kv = call.request, call.args["kv"]
        begin = request.resolve(call.args.get("begin"), 0)
        end = request.resolve(call.args.get("end"), len(request.prompt))
        if kv.rank == self.rank:
            raise ValueError("remote_send into this engine's own pages: it already computes "
                             "what it lacks in start_generate")
        if not 0 <= begin <= end <= kv.end:
            raise ValueError(f"remote_send of [{begin}, {end}) does not fit the receiver's "
                             f"reservation of [0, {kv.end})")
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
                                                 begin, end)

    def _abandon(self, call: Call, kv: KVAddress, begin: int, end: int, reason: str) -> None:
        """Announce a transfer that will carry no data, so the receiver falls back."""
        self.control.send(kv.rank, KVAnnounce(call.call_id, call.request.id, begin, end, (), "",
                                              0, ok=False, reason=f"rank {self.rank}: {reason}"))

    def _layer_hook(self, chunks):
        """Before the forward pass: announce the transfers whose prefill ends in this step;
        after each layer: send that layer's KV, overlapping the remaining layers."""
        ready = [self.to_send[id(c.seq)] for c in chunks
                 if id(c.seq) in self.to_send and c.end == c.seq.num_tokens]
        if not ready:
            return None
        kv = self.engine.kv
        for t in ready:
            t.slots = kv.slots(t.seq.page_ids, t.begin, t.end)
            shape = (2, t.end - t.begin, *kv.layers[0].shape[3:])
            self.control.send(t.dest, KVAnnounce(t.call_id, t.request_id, t.begin, t.end, shape,
                                                 dtype_name(self.engine.dtype), kv.num_layers))

        def send_layer(layer: int) -> None:
            for t in ready:
                t.send_layer(kv.read(layer, t.slots))
        return send_layer

    # ---- receiving ----------------------------------------------------------------------------
    def _announced(self, source: int, announce: KVAnnounce) -> None:
        target = self.reservations.get(announce.request_id)
        if not announce.ok:
            self._transfer_failed(target, announce, announce.reason)
            return
        problem = self._announce_problem(announce, target)
        buffers, works = post_receives(source, announce, self.engine.device)
        waiter = WorkWaiter(works, self.options.transfer_timeout_s)
        self.incoming.append(IncomingTransfer(source, announce, None if problem else target,
                                              buffers, waiter))
        if problem:
            self._transfer_failed(target, announce, problem)

    def _announce_problem(self, a: KVAnnounce, target: Sequence | None) -> str | None:
        kv = self.engine.kv
        expected = (2, a.end - a.begin, *kv.layers[0].shape[3:])
        if target is None:
            return f"no reservation for request {a.request_id!r} (prep_recv first)"
        if a.end > len(target.page_ids) * kv.page_size or a.begin > target.num_computed:
            return (f"[{a.begin}, {a.end}) does not continue the {target.num_computed} tokens "
                    f"held within the reserved {len(target.page_ids)} pages")
        if tuple(a.layer_shape) != expected or a.num_layers != kv.num_layers \
                or a.dtype != dtype_name(self.engine.dtype):
            return (f"size mismatch: got {a.num_layers} x {tuple(a.layer_shape)} {a.dtype}, "
                    f"expected {kv.num_layers} x {expected} {dtype_name(self.engine.dtype)}")
        return None

    def _transfer_failed(self, target: Sequence | None, announce: KVAnnounce, reason: str):
        if target is not None and self.reservations.get(announce.request_id) is target:
            self.engine.drop_reserved_tail(target)
        self.counters["transfers_failed"] += 1
        self._reply(TransferDone(announce.call_id, False, 0, reason))

    def _poll_transfers(self) -> bool:
        done_in = [t for t in self.incoming if t.waiter.finished]
        done_out = [t for t in self.sending if t.waiter.finished]
        for t in done_in:
            self.incoming.remove(t)
            self._landed(t)
        for t in done_out:
            self.sending.remove(t)
            self.engine.release(t.seq)
            self.counters["kv_bytes_sent"] += sum(b.numel() * b.element_size() for b in t.buffers)
        return bool(done_in or done_out)

    def _landed(self, t: IncomingTransfer) -> None:
        a, target = t.announce, t.target
        if target is None:
            return                                   # already reported as failed
        if t.waiter.error or self.reservations.get(a.request_id) is not target:
            self._transfer_failed(target, a, t.waiter.error or "request already started")
            return
        start = target.num_computed
        slots = self.engine.kv.slots(target.page_ids, start, a.end)
        for layer, buffer in enumerate(t.buffers):
            self.engine.kv.write(layer, slots, buffer[:, start - a.begin:])
        self.engine.kv_received(target, a.end)
        self.counters["kv_bytes_received"] += t.nbytes
        self._reply(TransferDone(a.call_id, True, t.nbytes))

    # ---- start_generate -----------------------------------------------------------------------
    def _start_generate(self, call: Call) -> None:
        request = call.request
        begin = request.resolve(call.args.get("begin"), 0)
        seq = self.reservations.pop(request.id, None)
        if seq is None:
            seq = self.engine.add_request(request.id, request.prompt, request.params)
            held = 0
        else:
            held = seq.num_computed
            self.engine.generate_reserved(seq)
        seq.fallback = held < min(begin, len(request.prompt) - 1)
        self.counters["fallbacks"] += seq.fallback
        self.generating[id(seq)] = call.call_id

    def _step(self) -> None:
        updates = []
        for event in self.engine.step(self._layer_hook):
            seq = event.seq
            if seq.prefill_only:
                transfer = self.to_send.pop(id(seq))
                transfer.start_waiting(self.options.transfer_timeout_s)
                self.sending.append(transfer)
                continue
            call_id = self.generating[id(seq)]
            info = None
            if event.finished:
                del self.generating[id(seq)]
                self.counters["requests_done"] += 1
                info = {"prefix_matched": seq.prefix_matched, "fallback": seq.fallback,
                        "preemptions": seq.num_preemptions}
            updates.append(TokenUpdate(call_id, [event.token], seq.finish_reason, info))
        if updates:
            self._reply(TokenBatch(updates))

    # ---- stats and exit -----------------------------------------------------------------------
    def _report_stats(self) -> None:
        now = time.monotonic()
        if now < self._next_stats:
            return
        self._next_stats = now + self.options.stats_interval_s
        self._reply(StatsSnapshot(self.rank, self.stats()))

    def stats(self) -> dict:
        engine, pool = self.engine, self.engine.pool
        return {"role": self.role, "host": self.host, "busy_s": self.busy_s, "running": len(engine.scheduler.running),
                "waiting": len(engine.scheduler.waiting), "pages_used": pool.num_used,
                "pages_total": pool.num_pages, "prefix_hit_tokens": pool.hit_tokens,
                "prefix_query_tokens": pool.queried_tokens,
                "prefill_tokens": engine.tokens_computed["prefill"],
                "decode_tokens": engine.tokens_computed["decode"],
                "preemptions": engine.scheduler.num_preemptions, **self.counters,
                "time": time.time()}

    def _finish_sends(self) -> None:
        deadline = time.monotonic() + self.options.transfer_timeout_s
        while self.sending and time.monotonic() < deadline:
            self._poll_transfers()
            time.sleep(0.005)
        self._reply(StatsSnapshot(self.rank, {**self.stats(), "final": True}))
        self.control.flush()

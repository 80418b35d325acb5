"""The data plane: KV of a token range moves layer by layer with torch.distributed P2P ops.

gloo's point-to-point works only complete inside `wait()`, so each transfer's works are
waited on by a short-lived thread with a deadline; the rank loop just reads `finished`.
Sends and receives between one pair are posted in announcement order (see messages.KVAnnounce).
"""

from __future__ import annotations

import datetime
import threading
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..engine.sequence import Sequence
from ..model.tensor_shard import WHOLE, TensorShard
from .kv_routes import kv_routes
from .messages import KVAnnounce


class WorkWaiter:
    """Waits for torch.distributed works in the background, bounded by `timeout_s` in all."""

    def __init__(self, works: list, timeout_s: float):
        self.error: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._wait, args=(works, timeout_s), daemon=True)
        self._thread.start()

    def _wait(self, works, timeout_s) -> None:
        deadline = time.monotonic() + timeout_s
        try:
            for work in works:
                left = max(0.001, deadline - time.monotonic())
                if not work.wait(timeout=datetime.timedelta(seconds=left)):
                    raise TimeoutError(f"no data within {timeout_s:.0f} s")
        except Exception as exc:                 # the transfer failed; the rank loop decides
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self._done.set()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def join(self) -> None:
        """Until finished (bounded: the works' deadline ends the wait)."""
        self._done.wait()


@dataclass
class OutgoingTransfer:
    """KV of prompt[begin:end] of `seq` going to rank `dest`, sent piece by piece as the prefill
    computes it; positions [begin, sent_upto) are announced already."""
    call_id: int
    request_id: str
    seq: Sequence
    dest: int
    begin: int
    end: int
    sent_upto: int = -1
    buffers: list = field(default_factory=list)
    works: list = field(default_factory=list)
    waiter: WorkWaiter | None = None

    def __post_init__(self):
        self.sent_upto = self.begin

    dest_tp: int = 1                                 # ranks of the receiving engine

    def sent(self, buffer: torch.Tensor, work) -> None:
        self.buffers.append(buffer)                  # kept alive until the send completes
        self.works.append(work)

    def start_waiting(self, timeout_s: float) -> None:
        self.waiter = WorkWaiter(self.works, timeout_s)


@dataclass
class IncomingCall:
    """A remote_send arriving in pieces into the reservation `target`."""
    target: Sequence | None
    expected: int | None = None         # where the next piece must begin
    nbytes: int = 0
    failed: bool = False                # reported; later pieces are drained and dropped


@dataclass
class IncomingStep:
    """Receives posted for one announcement (always posted, to keep the pair's order);
    `buffers[i][layer]` holds piece i's layer, one tensor per route. In a tensor-parallel
    engine the other `followers` ranks receive their heads and answer (step_plans.Landed)."""
    source: int
    announce: KVAnnounce
    buffers: list[list[list[torch.Tensor]]]
    waiter: WorkWaiter
    key: int = 0
    followers: int = 0
    answers: int = 0
    follower_error: str | None = None

    def answered(self, error: str | None) -> None:
        self.answers += 1
        self.follower_error = self.follower_error or error

    @property
    def complete(self) -> bool:
        return self.waiter.finished and self.answers >= self.followers

    @property
    def error(self) -> str | None:
        return self.waiter.error or self.follower_error


@dataclass(frozen=True)
class KVStream:
    """One prefill step's pieces going to one engine (its lead rank and TP size): the KV
    slots of each piece on the sending engine, in announcement order."""
    dest: int
    dest_tp: int
    slots: tuple[torch.Tensor, ...]

    def to(self, device) -> KVStream:
        return KVStream(self.dest, self.dest_tp, tuple(s.to(device) for s in self.slots))


def send_layer(kv, layer: int, streams, shard: TensorShard, num_kv_heads: int) -> list:
    """Post this rank's sends of one layer of every stream: for each piece, the heads each
    receiving rank needs from this rank (kv_routes). Returns (stream index, piece index,
    buffer, work) per send; buffers must live until their work completes."""
    held = shard.kv_head_range(num_kv_heads)
    posted = []
    for s, stream in enumerate(streams):
        routes = [r for r in kv_routes(num_kv_heads, shard.size, stream.dest_tp)
                  if r.sender == shard.rank]
        for p, slots in enumerate(stream.slots):
            if not routes:
                continue
            data = kv.read(layer, slots)
            for route in routes:
                buffer = data[:, :, route.local(held)].contiguous()
                posted.append((s, p, buffer, dist.isend(buffer, stream.dest + route.receiver)))
    return posted


def post_receives(source: int, announce: KVAnnounce, device,
                  shard: TensorShard = WHOLE) -> tuple[list, list]:
    """This rank's receive buffers per piece and layer (one per route, tiling its KV heads in
    order) and the works, posted layer-major like the sending ranks' sends. `source` is the
    sending engine's lead rank."""
    dtype = getattr(torch, announce.dtype)
    num_kv_heads, dim = announce.token_shape
    routes = [r for r in kv_routes(num_kv_heads, announce.source_tp, shard.size)
              if r.receiver == shard.rank]

    def buffer(piece, route):
        return torch.empty((2, piece.end - piece.begin, route.heads[1] - route.heads[0], dim),
                           dtype=dtype, device=device)
    buffers = [[[buffer(piece, route) for route in routes] for _ in range(announce.num_layers)]
               for piece in announce.pieces]
    works = [dist.irecv(buffers[i][layer][k], source + route.sender)
             for layer in range(announce.num_layers) for i in range(len(announce.pieces))
             for k, route in enumerate(routes)]
    return buffers, works


def joined(route_buffers: list[torch.Tensor]) -> torch.Tensor:
    """One piece's layer as this rank holds it: its routes' heads side by side."""
    return route_buffers[0] if len(route_buffers) == 1 else torch.cat(route_buffers, dim=2)


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

    def send_layer(self, buffer: torch.Tensor) -> None:
        self.buffers.append(buffer)                  # kept alive until the send completes
        self.works.append(dist.isend(buffer, self.dest))


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
    `buffers[i]` holds piece i's layers."""
    source: int
    announce: KVAnnounce
    buffers: list[list[torch.Tensor]]
    waiter: WorkWaiter


def post_receives(source: int, announce: KVAnnounce, device) -> tuple[list, list]:
    """Receive buffers per piece and the works, posted layer-major like the sender's sends."""
    dtype = getattr(torch, announce.dtype)
    buffers = [[torch.empty(announce.layer_shape(piece), dtype=dtype, device=device)
                for _ in range(announce.num_layers)] for piece in announce.pieces]
    works = [dist.irecv(buffers[i][layer], source)
             for layer in range(announce.num_layers) for i in range(len(announce.pieces))]
    return buffers, works


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)

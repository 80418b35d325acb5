"""Control-plane messages: small picklable objects sent over mpi4py (never KV data)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class Request:
    """What a router sees of one request: `prompt` is a list of token ids."""
    id: str
    prompt: list[int]
    params: SamplingParams

    def resolve(self, index: int | None, default: int) -> int:
        """A Python-style index into the prompt as an absolute position (None -> default)."""
        n = len(self.prompt)
        if index is None:
            return default
        if not -n <= index <= n:
            raise IndexError(f"request {self.id!r}: index {index} outside a prompt of {n} tokens")
        return index + n if index < 0 else index


@dataclass(frozen=True)
class KVAddress:
    """Where a receiver will hold the KV of `prompt[:end]`: its first `matched` tokens are
    already there (prefix cache); `page_ids` are its pages for positions [0, end)."""
    rank: int
    request_id: str
    matched: int
    end: int
    page_ids: tuple[int, ...]
    tp: int = 1                 # the receiver's tensor-parallel size (ranks holding the KV)


# ---- router -> engine --------------------------------------------------------------------
@dataclass(frozen=True)
class Call:
    call_id: int
    method: str            # "prep_recv" | "remote_send" | "start_generate" | "release"
    request: Request
    args: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Shutdown:
    reason: str = "done"


# ---- engine -> router --------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """The answer to a call; `error` is a formatted message with the engine's rank."""
    call_id: int
    value: object = None
    error: str | None = None


class TokenUpdate(NamedTuple):      # a tuple: one per generated token
    """New tokens of one of a start_generate call's samples (sample 0 unless n > 1);
    `finish_reason` is set when that sample finished, `done` when the whole call did."""
    call_id: int
    tokens: list[int]
    finish_reason: str | None = None
    info: dict | None = None            # on the last update: prefix_matched, fallback, ...
    done: bool = False
    sample: int = 0
    logprobs: list | None = None        # TokenLogprob per token, when the request asked


@dataclass(frozen=True)
class TokenBatch:
    """All token updates one engine step produced, in one message."""
    updates: list[TokenUpdate]


@dataclass(frozen=True)
class TransferDone:
    """From the receiver: the KV of a remote_send call has landed (or failed)."""
    call_id: int
    ok: bool
    nbytes: int
    reason: str = ""


@dataclass(frozen=True)
class StatsSnapshot:
    rank: int
    stats: dict


@dataclass(frozen=True)
class FollowerFinal:
    """A tensor-parallel follower rank's last message: how many heartbeats it sent."""
    rank: int
    heartbeats_sent: int


@dataclass(frozen=True)
class Fatal:
    rank: int
    traceback: str


# ---- engine -> engine --------------------------------------------------------------------
@dataclass(frozen=True)
class KVPiece:
    """Positions [begin, end) of one remote_send's range; `last` marks its final piece."""
    call_id: int
    request_id: str
    begin: int
    end: int
    last: bool


@dataclass(frozen=True)
class KVAnnounce:
    """Sent by a sender before it posts the point-to-point sends of one prefill step to one
    receiver: for each layer in order, one send per piece in order (layer-major). The receiver
    posts its receives in the same order, so both sides agree without tags (NCCL ignores them).

    A remote_send's range arrives as consecutive pieces, one per prefill step of the sender, so
    each piece streams while the sender computes the next.
    """
    pieces: tuple[KVPiece, ...]
    token_shape: tuple[int, ...]        # [kv_heads, head_dim] of the whole model
    dtype: str
    num_layers: int
    source_tp: int = 1                  # ranks of the sending engine (see kv_routes)


@dataclass(frozen=True)
class KVAbandon:
    """The sender will send nothing for this remote_send (it failed); the receiver recomputes."""
    call_id: int
    request_id: str
    reason: str

"""Checks of the microserving calls' arguments that every engine makes the same way, real or
simulated (pure)."""

from __future__ import annotations

from .messages import KVAddress, Request


def send_range(request: Request, kv: KVAddress, begin, end, sender: int) -> tuple[int, int]:
    """remote_send's [begin, end) as absolute positions; a ValueError if it cannot be sent
    from engine `sender` into the reservation `kv`."""
    begin = request.resolve(begin, 0)
    end = request.resolve(end, len(request.prompt))
    if kv.rank == sender:
        raise ValueError("remote_send into this engine's own pages: it already computes "
                         "what it lacks in start_generate")
    if not 0 <= begin <= end <= kv.end:
        raise ValueError(f"remote_send of [{begin}, {end}) does not fit the receiver's "
                         f"reservation of [0, {kv.end})")
    return begin, end

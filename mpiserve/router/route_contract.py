"""What a router must do with a request, checked as it runs: yield lists of token ids from the
vocabulary, and return only after a start_generate stream has finished."""

from __future__ import annotations

from collections.abc import AsyncIterator
from numbers import Integral

from ..cluster.messages import Request
from ..errors import RouterMisuseError


def checked_tokens(chunk, vocab_size: int) -> list[int]:
    """A router's yield must be a list of token ids in [0, vocab_size)."""
    # the usual case first, without the ABCs below, and in a loop rather than all() over a
    # generator: this runs for every yield of every request
    if type(chunk) is list:
        for t in chunk:
            if type(t) is not int or not 0 <= t < vocab_size:
                break
        else:
            return list(chunk)
    if not isinstance(chunk, list | tuple) or not all(
            isinstance(t, Integral) and not isinstance(t, bool) and 0 <= t < vocab_size
            for t in chunk):
        raise RouterMisuseError(f"the router yielded {chunk!r:.80}; a router yields lists of "
                                f"token ids in [0, {vocab_size})")
    return [int(t) for t in chunk]


async def routed_tokens(route, request: Request, cluster, vocab_size: int
                        ) -> AsyncIterator[list[int]]:
    """The router's yields for `request`, each checked; raises if it returns too early."""
    async for chunk in route(request, cluster):
        yield checked_tokens(chunk, vocab_size)
    if cluster.trace(request).finish_reason is None:
        raise RouterMisuseError("the router returned before a start_generate stream "
                                "finished: it must yield one stream to its end")

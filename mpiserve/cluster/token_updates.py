"""What the router receives of one engine step's tokens: one TokenUpdate per event, the last
of a request marked done with its info once every sample finished (pure; shared by the real
and the simulated engine)."""

from __future__ import annotations

from collections.abc import Callable

from ..engine.engine_core import TokenEvent
from ..engine.sequence import Sequence, all_samples_finished
from .messages import TokenUpdate


def token_updates(events: list[TokenEvent], generating: dict[str, Sequence],
                  call_of: Callable[[Sequence], int],
                  finished: Callable[[Sequence], dict]) -> list[TokenUpdate]:
    """`generating`: request id -> the request's sample 0; `call_of(sample 0)`: its
    start_generate call id; `finished(sample 0)` forgets a request and returns its info."""
    last = {event.seq.seq_id: i for i, event in enumerate(events)}
    updates = []
    for i, event in enumerate(events):
        seq = event.seq
        first = generating[seq.seq_id]
        call_id = call_of(first)
        done = last[seq.seq_id] == i and all_samples_finished(first)
        info = finished(first) if done else None
        logprobs = seq.logprobs[-1:] if seq.params.logprobs is not None else None
        updates.append(TokenUpdate(call_id, [event.token], seq.finish_reason, info, done,
                                   seq.sample_index, logprobs))
    return updates


def finish_info(seq: Sequence) -> dict:
    """The info of a finished request's last update."""
    info = {"prefix_matched": seq.prefix_matched, "fallback": seq.fallback,
            "preemptions": seq.num_preemptions}
    if seq.params.prompt_logprobs is not None:
        info["prompt_logprobs"] = seq.prompt_logprobs
    return info

"""An engine rank's generating requests and what the router receives of them: one TokenUpdate
per token event, the last of a request marked done with its info once every sample finished
(pure; the same bookkeeping for the real engine rank and the simulated one)."""

from __future__ import annotations

from ..engine.engine_core import EngineCore, TokenEvent
from ..engine.sequence import Sequence, all_samples_finished
from .messages import Call, TokenUpdate

# what an engine rank counts for its stats
COUNTERS = ("kv_bytes_sent", "kv_bytes_received", "transfers_failed", "fallbacks",
            "requests_done", "requests_aborted")


class Generations:
    """The requests `engine` generates, each by its sample 0, and the start_generate call
    each one answers; `counters` are the rank's (see COUNTERS)."""

    def __init__(self, engine: EngineCore):
        self.engine = engine
        self.counters = dict.fromkeys(COUNTERS, 0)
        # request id -> its sample 0 and the start_generate call id
        self._generating: dict[str, tuple[Sequence, int]] = {}

    def start(self, call: Call, reserved: Sequence | None) -> Sequence:
        """start_generate, on the reservation prep_recv made for it (if any)."""
        request = call.request
        seq = self.engine.start_generation(request.id, request.prompt, request.params,
                                           reserved, request.resolve(call.args.get("begin"), 0))
        self.counters["fallbacks"] += seq.fallback
        self._generating[request.id] = seq, call.call_id
        return seq

    def abort(self, request_id: str) -> TokenUpdate | None:
        """Stop a request's generation; the update that ends its stream (None: not here)."""
        seq, call_id = self._generating.pop(request_id, (None, None))
        if seq is None:
            return None
        self.engine.abort(seq)
        self.counters["requests_aborted"] += 1
        return TokenUpdate(call_id, [], "abort", done=True)

    def updates(self, events: list[TokenEvent]) -> list[TokenUpdate]:
        """The step's token events as the router receives them."""
        updates = []
        for i, (seq, token, finished) in enumerate(events):
            first, call_id = self._generating[seq.seq_id]
            done = finished and all_samples_finished(first) and _last_of_request(events, i)
            info = self._finished(first) if done else None
            logprobs = seq.logprobs[-1:] if seq.params.logprobs is not None else None
            updates.append(TokenUpdate(call_id, [token], seq.finish_reason, info, done,
                                       seq.sample_index, logprobs))
        return updates

    def _finished(self, first: Sequence) -> dict:
        """Forget a request whose samples all finished; the info of its last update."""
        del self._generating[first.seq_id]
        self.counters["requests_done"] += 1
        info = {"prefix_matched": first.prefix_matched, "fallback": first.fallback,
                "preemptions": first.num_preemptions}
        if first.params.prompt_logprobs is not None:
            info["prompt_logprobs"] = first.prompt_logprobs
        return info


def _last_of_request(events: list[TokenEvent], i: int) -> bool:
    """Whether no later event of the step is one of the same request's samples."""
    seq_id = events[i].seq.seq_id
    return all(event.seq.seq_id != seq_id for event in events[i + 1:])

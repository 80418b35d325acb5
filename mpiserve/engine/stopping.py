"""When a sequence stops generating, and the text it returns (pure logic)."""

from __future__ import annotations

from collections.abc import Callable

from .sequence import Sequence


def finish_reason(seq: Sequence, eos_ids: tuple[int, ...], max_model_len: int,
                  text_of: Callable[[list[int]], str] | None) -> str | None:
    """'stop' (eos, a stop token id or a stop string, once min_tokens are out), 'length'
    (max_tokens or context full) or None."""
    params = seq.params
    if len(seq.output) >= params.min_tokens and _stops(seq, eos_ids, text_of):
        return "stop"
    if len(seq.output) >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length"
    return None


def _stops(seq: Sequence, eos_ids: tuple[int, ...],
           text_of: Callable[[list[int]], str] | None) -> bool:
    params, last = seq.params, seq.output[-1] if seq.output else None
    if last is not None and (last in params.stop_token_ids
                             or (not params.ignore_eos and last in eos_ids)):
        return True
    return bool(params.stop and text_of is not None
                and stop_index(text_of(seq.output), params.stop) >= 0)


def stop_index(text: str, stops: tuple[str, ...]) -> int:
    """Where the earliest stop string starts in `text`, or -1."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found, default=-1)


def visible_text(text: str, stops: tuple[str, ...]) -> str:
    """The text a client receives: cut before the first stop string."""
    cut = stop_index(text, stops)
    return text if cut < 0 else text[:cut]

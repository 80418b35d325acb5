"""Balanced prefill-decode disaggregation: the decode engine also prefills the tail of the
prompt, so prefill work is shared instead of piling up on the prefill engines.

`--router-arg decode_fraction=auto` (the default, and the recommended setting) chooses the
split per request from what rank 0 measures: each engine's prefill speed (tokens per second,
from its stats), the prefill work queued on it, and the decode work its requests still have.
The split equalises when the two engines would be done: the prefill engine with its queue
plus the head of the prompt, the decode engine with its queue plus the tail of the prompt plus
the tokens it still has to generate. The decode engine computes between `min_fraction`
(default 0, i.e. at least the last token) and `max_fraction` (default 0.5) of the prompt.
`decode_fraction=0.1` (a number) fixes the share instead.
"""

import math
from collections import Counter

_pending_tail: Counter = Counter()    # decode rank -> prompt tokens it will prefill once the
                                      # requests' KV transfers land (not yet in its load)
_pending_decode: Counter = Counter()  # decode rank -> tokens its requests may still generate


def auto_split(n, *, prefill_queue, decode_queue, prefill_engine_rate=None,
               decode_engine_rate=None, decode_work_s=0.0, prefill_cached=0, decode_cached=0,
               min_fraction=0.0, max_fraction=0.5):
    """The prompt position up to which the prefill engine computes (the decode engine computes
    the rest), chosen so that both engines finish together:

        (prefill_queue + split - cached) / prefill_engine_rate
            == (decode_queue + n - split) / decode_engine_rate + decode_work_s

    Queues are prompt tokens still to prefill on each engine; the rates are each engine's
    prefill speed in tokens per second (None: unknown, taken equal to the other engine's; both
    unknown: equal); `decode_work_s` is the decode engine's generation work in seconds. Prompt
    tokens an engine already holds cost it nothing. The decode engine's share stays within
    [min_fraction, max_fraction] of the prompt, and it computes at least the last token.
    """
    rate_p = prefill_engine_rate or decode_engine_rate
    rate_d = decode_engine_rate or prefill_engine_rate
    if rate_p is None:
        rate_p = rate_d = 1.0                          # only tokens to compare: drop seconds
        decode_work_s = 0.0
    cached = max(prefill_cached, decode_cached)        # the prefill side's work starts here
    split = ((decode_queue + n) / rate_d + decode_work_s - (prefill_queue - cached) / rate_p) \
        / (1.0 / rate_p + 1.0 / rate_d)
    split = max(split, cached)       # below the cached prefix, a larger split is free
    lowest = n - math.floor(n * max_fraction)
    highest = n - max(1, math.ceil(n * min_fraction))
    return int(max(0, min(highest, n - 1, max(lowest, round(split)))))


def parse_fraction(text, key: str = "decode_fraction") -> float | None:
    """A share of the prompt given as text: a number in [0, 1], or None for "auto" (allowed
    for decode_fraction only); anything else is a ValueError naming the option."""
    value = str(text).strip().lower()
    if value == "auto" and key == "decode_fraction":
        return None
    try:
        fraction = float(value)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"--router-arg {key}={value}: use a number in [0, 1]"
                         + (" or auto" if key == "decode_fraction" else ""))
    return fraction


def _fraction(cluster, key, default):
    return parse_fraction(cluster.args.get(key, default), key)


def choose_split(request, cluster, prefill, decode):
    """Where balanced_pd splits this request's prompt between `prefill` and `decode`."""
    n = len(request.prompt)
    fixed = _fraction(cluster, "decode_fraction", "auto")
    if fixed is not None:
        return min(n - 1, int(n * (1 - fixed)))
    decode_speed = cluster.decode_rate(decode)
    return auto_split(
        n, prefill_queue=prefill.load.queued_prefill,
        decode_queue=decode.load.queued_prefill + _pending_tail[decode.rank],
        prefill_engine_rate=cluster.prefill_rate(prefill),
        decode_engine_rate=cluster.prefill_rate(decode),
        decode_work_s=_pending_decode[decode.rank] / decode_speed if decode_speed else 0.0,
        prefill_cached=cluster.cached_prefix(prefill, request),
        decode_cached=cluster.cached_prefix(decode, request),
        min_fraction=_fraction(cluster, "min_fraction", 0.0),
        max_fraction=_fraction(cluster, "max_fraction", 0.5))


async def balanced_pd(request, cluster):
    prefill = cluster.least_loaded(cluster.prefill or cluster.engines)
    decode = cluster.least_loaded(cluster.decode or cluster.engines)
    if prefill is decode:
        cluster.note_strategy(request, "data_parallel")
        async for tokens in decode.start_generate(request):
            yield tokens
        return
    split = choose_split(request, cluster, prefill, decode)
    tail, left = len(request.prompt) - split, request.params.max_tokens
    cluster.note_strategy(request, "balanced_pd")
    _pending_tail[decode.rank] += tail
    _pending_decode[decode.rank] += left
    try:
        try:
            kv = await decode.prep_recv(request, end=split)
            if kv.matched < split:
                await prefill.remote_send(request, kv, begin=kv.matched, end=split)
        finally:
            _pending_tail[decode.rank] -= tail         # from here on it is in decode.load
        async for tokens in decode.start_generate(request, begin=split):
            left -= len(tokens)
            _pending_decode[decode.rank] -= len(tokens)
            yield tokens
    finally:
        _pending_decode[decode.rank] -= left

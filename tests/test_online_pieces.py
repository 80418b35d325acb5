"""Pure pieces of `mpiserve serve`: the streamed text of a sample, the Prometheus histogram,
and admission (a full server answers 429 with Retry-After, a stopping one 503)."""

import asyncio

import pytest

from mpiserve.online.online_runner import ApiError, OnlineRunner
from mpiserve.online.prometheus import Histogram
from mpiserve.online.text_stream import TextStream
from mpiserve.router.request_prompt import ModelLimits

PIECES = {1: "Hel", 2: "lo", 3: "\n", 4: "\n", 5: "wor", 6: "\ufffd", 7: "ld"}


def decode(tokens):
    """Token 6 alone is half a character: it decodes as U+FFFD until token 7 completes it."""
    text = "".join(PIECES[t] for t in tokens)
    return text.replace("\ufffdld", "\u00e9ld")


def stream_all(tokens, stops=()):
    stream = TextStream(decode, stops)
    return [stream.advance(tokens[:i], i == len(tokens)) for i in range(1, len(tokens) + 1)]


def test_pieces_add_up_and_a_half_character_waits():
    pieces = stream_all([1, 2, 5, 6, 7])
    assert pieces == ["Hel", "lo", "wor", "", "\u00e9ld"]
    assert "".join(pieces) == decode([1, 2, 5, 6, 7])


def test_a_possible_stop_string_is_held_back_and_never_sent():
    assert "".join(stream_all([1, 2, 3, 4, 5], stops=("\n\n",))) == "Hello"
    held = stream_all([1, 2, 3, 5], stops=("\n\n",))
    assert held == ["Hel", "lo", "", "\nwor"]      # a lone newline went out once settled


def test_histogram_buckets_are_cumulative():
    histogram = Histogram((0.1, 1.0))
    for value in (0.05, 0.5, 0.7, 3.0, None):
        histogram.observe(value)
    lines = histogram.lines("x")
    assert 'x_bucket{le="0.1"} 1' in lines and 'x_bucket{le="1.0"} 3' in lines
    assert 'x_bucket{le="+Inf"} 4' in lines and "x_count 4" in lines
    assert any(line.startswith("x_sum 4.25") for line in lines)


class _IdleCluster:
    def check_engines(self):
        pass

    def trace(self, request):
        raise AssertionError("no request should be admitted")


def test_full_or_stopping_server_refuses_before_parsing():
    runner = OnlineRunner(_IdleCluster(), None, "r", None, ModelLimits("m", 10, 100),
                          max_inflight=2)
    runner.live = {"a": None, "b": None}
    with pytest.raises(ApiError) as full:
        runner.start({"prompt": "x"}, "completion")
    assert full.value.status == 429 and full.value.headers == {"Retry-After": "1"}
    asyncio.run(_stop(runner))
    with pytest.raises(ApiError) as stopping:
        runner.start({"prompt": "x"}, "completion")
    assert stopping.value.status == 503


async def _stop(runner):
    runner.stop()

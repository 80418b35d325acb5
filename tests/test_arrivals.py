"""Timed arrivals: the `arrival_s` extension of batch input lines, and the batch runtime admitting
each request no earlier than its arrival, with latencies counted from the arrival (small real
sleeps, generous tolerances), plus per-request inter-token latencies."""

import asyncio
import json
import time

import pytest

from mpiserve.batch.input_file import read_batch
from mpiserve.batch.output_file import BatchOutput
from mpiserve.router.batch_runner import BatchRunner
from mpiserve.router.cluster import Cluster
from mpiserve.router.request_prompt import ModelLimits
from mpiserve.router.request_trace import RequestTrace

LATE_S = 0.15            # admitted at most this long after its arrival (a loaded CI machine)


def line(custom_id, prompt=(5, 6, 7), **top):
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
                       "body": {"prompt": list(prompt), "max_tokens": 3}, **top})


def items_of(tmp_path, *lines):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(x + "\n" for x in lines))
    return list(read_batch(path))


# ---- parsing --------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [(0, 0.0), (2.5, 2.5), (30, 30.0), (None, None)])
def test_arrival_is_parsed(tmp_path, value, expected):
    extra = {} if value is None else {"arrival_s": value}
    (item,) = items_of(tmp_path, line("a", **extra))
    assert item.error is None and item.arrival_s == expected


def test_explicit_null_arrival_means_none(tmp_path):
    (item,) = items_of(tmp_path, line("a", arrival_s=None))
    assert item.error is None and item.arrival_s is None


@pytest.mark.parametrize("value", [-1, -0.5, "3", True, [1], {"s": 1}])
def test_invalid_arrival_is_an_error_naming_line_and_field(tmp_path, value):
    ok, bad = items_of(tmp_path, line("ok", arrival_s=1), line("bad", arrival_s=value))
    assert ok.error is None
    assert bad.custom_id == "bad" and bad.arrival_s is None
    assert "line 2" in bad.error and "arrival_s must be a number >= 0" in bad.error


def test_infinite_arrival_is_refused(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text(line("a").replace('"custom_id"', '"arrival_s": Infinity, "custom_id"') + "\n")
    (item,) = read_batch(path)
    assert "arrival_s" in item.error


# ---- inter-token latencies ------------------------------------------------------------------
def test_inter_token_latencies_are_rounded_and_average_to_tpot():
    trace = RequestTrace(arrival=10.0)
    for t in (10.5, 10.52, 10.52, 10.60012):
        trace.tokens_arrived(1, now=t)
    trace.finished = 10.7
    m = trace.metrics("r", itl=True)
    assert m["itl"] == [0.02, 0.0, 0.0801]
    assert m["ttft"] == pytest.approx(0.5) and m["jct"] == pytest.approx(0.7)
    assert m["tpot"] == pytest.approx(sum(m["itl"]) / 3, abs=1e-4)
    assert "itl" not in trace.metrics("r")


def test_latencies_count_from_the_arrival():
    trace = RequestTrace(arrival=1.0, started=3.0)
    trace.tokens_arrived(1, now=4.0)
    trace.finished = 5.0
    m = trace.metrics("r")
    assert (m["queue_time"], m["ttft"], m["jct"]) == (2.0, 3.0, 4.0)


# ---- admission --------------------------------------------------------------------------------
class FakeDispatcher:
    def __init__(self, ready=True):
        self.stats = {1: {}, 2: {}} if ready else {}
        self.failure = None


class FakeTokenizer:
    def decode(self, tokens):
        return " ".join(map(str, tokens))


def make_runner(tmp_path, route, dispatcher=None, max_inflight=8, record_itl=False):
    cluster = Cluster(dispatcher or FakeDispatcher(), {1: "prefill", 2: "decode"}, 16)
    output = BatchOutput(tmp_path / "out.jsonl")
    return BatchRunner(cluster, route, "fake", FakeTokenizer(), ModelLimits("m", 100, 1000),
                       output, max_inflight, drain_timeout_s=5.0, record_itl=record_itl,
                       ready_poll_s=0.01), output


def records(tmp_path):
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    return {r["custom_id"]: r for r in map(json.loads, lines)}


def generating_route(started: dict, runner_box: list, step_s: float = 0.01):
    async def route(request, cluster):
        started[request.id] = time.monotonic() - runner_box[0].clock_origin
        trace = cluster.trace(request)
        for _ in range(request.params.max_tokens):
            await asyncio.sleep(step_s)
            trace.tokens_arrived(1)
            yield [9]
        trace.finish_reason = "length"     # what an engine's finished stream records
    return route


def test_requests_are_admitted_no_earlier_than_their_arrival(tmp_path):
    started, box = {}, []
    runner, output = make_runner(tmp_path, generating_route(started, box), record_itl=True)
    box.append(runner)
    items = items_of(tmp_path, line("a", arrival_s=0), line("b", arrival_s=0.3),
                     line("c"), line("d", arrival_s=0.5), line("e", arrival_s=0.5))
    tally = asyncio.run(runner.run(items, total=5))
    output.close()
    assert tally.completed == 5 and tally.failed == 0
    expected = {"a": 0.0, "b": 0.3, "c": 0.3, "d": 0.5, "e": 0.5}
    for custom_id, arrival in expected.items():
        assert arrival - 0.005 <= started[custom_id] <= arrival + LATE_S, started
    metrics = {i: r["response"]["body"]["metrics"] for i, r in records(tmp_path).items()}
    for m in metrics.values():
        assert 0 <= m["queue_time"] < LATE_S
        assert m["ttft"] >= m["queue_time"] and m["jct"] >= m["ttft"]
        assert len(m["itl"]) == 2 and all(x >= 0 for x in m["itl"])


def test_waiting_for_a_slot_counts_as_queue_time(tmp_path):
    started, box = {}, []
    runner, output = make_runner(tmp_path, generating_route(started, box, step_s=0.05),
                                 max_inflight=1)
    box.append(runner)
    items = items_of(tmp_path, line("a", arrival_s=0), line("b", arrival_s=0))
    asyncio.run(runner.run(items, total=2))
    output.close()
    m = records(tmp_path)["b"]["response"]["body"]["metrics"]
    assert m["queue_time"] >= 0.12                   # "a" held the only slot for ~0.15 s
    assert m["ttft"] >= m["queue_time"] + 0.04 and "itl" not in m


def test_the_clock_starts_when_every_engine_reported(tmp_path):
    started, box = {}, []
    dispatcher = FakeDispatcher(ready=False)
    runner, output = make_runner(tmp_path, generating_route(started, box), dispatcher)
    box.append(runner)

    async def main():
        began = time.monotonic()
        job = asyncio.create_task(runner.run(items_of(tmp_path, line("a", arrival_s=0.1)), 1))
        await asyncio.sleep(0.2)
        dispatcher.stats[1] = {}
        await asyncio.sleep(0.1)
        assert runner.clock_origin is None              # rank 2 has not reported yet
        dispatcher.stats[2] = {}
        await job
        return began

    began = asyncio.run(main())
    output.close()
    assert runner.clock_origin - began >= 0.3
    assert 0.1 - 0.005 <= started["a"] <= 0.1 + LATE_S


def test_a_stop_interrupts_the_wait_for_an_arrival(tmp_path):
    started, box = {}, []
    runner, output = make_runner(tmp_path, generating_route(started, box))
    box.append(runner)
    items = items_of(tmp_path, line("a", arrival_s=0), line("b", arrival_s=30))

    async def main():
        asyncio.get_running_loop().call_later(0.2, runner.stop)
        return await runner.run(items, total=2)

    began = time.monotonic()
    tally = asyncio.run(main())
    output.close()
    assert time.monotonic() - began < 5
    assert tally.interrupted and tally.completed == 1 and tally.seen == 1
    assert list(records(tmp_path)) == ["a"]


def test_an_invalid_arrival_is_written_as_an_error_record(tmp_path):
    started, box = {}, []
    runner, output = make_runner(tmp_path, generating_route(started, box))
    box.append(runner)
    items = items_of(tmp_path, line("a", arrival_s=-2), line("b"))
    tally = asyncio.run(runner.run(items, total=2))
    output.close()
    got = records(tmp_path)
    assert tally.failed == 1 and tally.completed == 1
    assert "arrival_s" in got["a"]["error"]["message"] and got["a"]["error"]["line"] == 1

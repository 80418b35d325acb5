"""Auto-balanced disaggregation: engine speeds estimated from stats counters, and the split that
makes the prefill and the decode engine finish together (pure bookkeeping, no MPI)."""

import asyncio
import importlib

import pytest

from mpiserve.cluster.messages import KVAddress, Request, TransferDone
from mpiserve.engine.sampling_params import SamplingParams
from mpiserve.router.cluster import Cluster
from mpiserve.router.engine_speed import SpeedEstimator
from mpiserve.routers.balanced_pd import auto_split, balanced_pd

bpd = importlib.import_module("mpiserve.routers.balanced_pd")


# ---- SpeedEstimator -----------------------------------------------------------------------------
def test_no_rates_until_work_was_seen():
    est = SpeedEstimator()
    assert est.speed.prefill_rate is None and est.speed.decode_rate is None
    est.observe(0, 0, 0.0)
    est.observe(0, 0, 0.0)                                   # nothing happened
    assert est.speed.prefill_rate is None


def test_pure_intervals_give_their_rates():
    est = SpeedEstimator()
    est.observe(0, 0, 0.0)
    est.observe(1000, 0, 2.0)                                # 500 prefill tokens/s
    est.observe(1000, 100, 3.0)                              # 100 decode tokens/s
    assert est.speed.prefill_rate == pytest.approx(500)
    assert est.speed.decode_rate == pytest.approx(100)


def test_mixed_interval_charges_decode_at_its_known_cost():
    est = SpeedEstimator()
    est.observe(0, 0, 0.0)
    est.observe(0, 100, 1.0)                                 # 10 ms per decode token
    est.observe(400, 150, 2.5)                               # 0.5 s decode, 1.0 s for 400 prefill
    assert est.speed.prefill_rate == pytest.approx(400)
    assert est.speed.decode_rate == pytest.approx(100)


def test_recent_intervals_weigh_more():
    est = SpeedEstimator(decay=0.5)
    est.observe(0, 0, 0.0)
    est.observe(1000, 0, 1.0)                                # 1000 tokens/s
    for i in range(1, 8):
        est.observe(1000 + 100 * i, 0, 1.0 + i)              # now 100 tokens/s
    assert 100 <= est.speed.prefill_rate < 110


def test_counter_restart_and_idle_time_are_ignored():
    est = SpeedEstimator()
    est.observe(500, 0, 5.0)
    est.observe(100, 0, 1.0)                                 # went backwards: skipped
    est.observe(300, 0, 2.0)                                 # 200 tokens in 1 s
    est.observe(300, 0, 2.0)                                 # idle: no busy time added
    assert est.speed.prefill_rate == pytest.approx(200)


class FakeDispatcher:
    def __init__(self):
        self.stats, self.failure = {}, None
        self.calls = []

    async def call(self, rank, method, request, **args):
        self.calls.append((rank, method, dict(args)))
        if method == "prep_recv":
            end = request.resolve(args["end"], len(request.prompt))
            return KVAddress(rank, request.id, 0, end, tuple(range(end // 16 + 1)))
        return TransferDone(0, True, 64)

    def stream(self, rank, request, **args):
        from mpiserve.cluster.messages import TokenUpdate
        self.calls.append((rank, "start_generate", dict(args)))
        queue = asyncio.Queue()
        for i in range(request.params.max_tokens):
            last = i == request.params.max_tokens - 1
            queue.put_nowait(TokenUpdate(0, [7], "length" if last else None, done=last))
        return queue


def test_cluster_rates_follow_new_snapshots():
    dispatcher = FakeDispatcher()
    cluster = Cluster(dispatcher, {1: "prefill", 2: "decode"}, 16)
    engine = cluster.prefill[0]
    assert cluster.prefill_rate(engine) is None
    dispatcher.stats[1] = {"prefill_tokens": 0, "decode_tokens": 0, "busy_s": 0.0}
    assert cluster.prefill_rate(engine) is None
    dispatcher.stats[1] = {"prefill_tokens": 600, "decode_tokens": 0, "busy_s": 2.0}
    assert cluster.prefill_rate(engine) == pytest.approx(300)
    assert cluster.prefill_rate(engine) == pytest.approx(300)   # the same snapshot twice
    assert cluster.decode_rate(engine) is None
    assert cluster.speed(cluster.decode[0]).prefill_rate is None


# ---- auto_split ---------------------------------------------------------------------------------
def test_equal_idle_engines_split_in_the_middle():
    assert auto_split(1000, prefill_queue=0, decode_queue=0) == 500


def test_a_faster_prefill_engine_takes_more():
    split = auto_split(1000, prefill_queue=0, decode_queue=0, prefill_engine_rate=300,
                       decode_engine_rate=100, max_fraction=1.0)
    assert split == 750                      # 750/300 == 250/100


def test_queues_and_decode_work_move_the_split():
    base = auto_split(1000, prefill_queue=0, decode_queue=0, prefill_engine_rate=100,
                      decode_engine_rate=100)
    busy_prefill = auto_split(1000, prefill_queue=600, decode_queue=0, prefill_engine_rate=100,
                              decode_engine_rate=100)
    busy_decode = auto_split(1000, prefill_queue=0, decode_queue=600, prefill_engine_rate=100,
                             decode_engine_rate=100)
    decoding = auto_split(1000, prefill_queue=0, decode_queue=0, prefill_engine_rate=100,
                          decode_engine_rate=100, decode_work_s=4.0)
    assert busy_prefill == 500                              # clamped: decode takes at most half
    assert busy_decode == 800 and decoding == 700 and base == 500


def test_the_equation_holds_inside_the_bounds():
    n, qp, qd, rp, rd, work = 2000, 300, 100, 800.0, 600.0, 0.5
    split = auto_split(n, prefill_queue=qp, decode_queue=qd, prefill_engine_rate=rp,
                       decode_engine_rate=rd, decode_work_s=work, max_fraction=1.0)
    assert (qp + split) / rp == pytest.approx((qd + n - split) / rd + work, abs=2 / rd)


def test_bounds_hold():
    for qp, qd in ((0, 0), (10_000, 0), (0, 10_000)):
        split = auto_split(100, prefill_queue=qp, decode_queue=qd, min_fraction=0.1,
                           max_fraction=0.4)
        assert 60 <= split <= 90
    assert auto_split(1, prefill_queue=0, decode_queue=0) == 0
    assert auto_split(2, prefill_queue=0, decode_queue=5) == 1     # decode keeps the last token


def test_a_cached_prefix_is_free_for_the_prefill_side():
    split = auto_split(1000, prefill_queue=0, decode_queue=0, prefill_cached=800)
    assert split == 900                      # the rest [800, 1000) shared evenly
    split = auto_split(1000, prefill_queue=500, decode_queue=0, decode_cached=900,
                       max_fraction=1.0)
    assert split == 900                      # the decode engine holds [0, 900): no transfer


def test_an_unknown_rate_borrows_the_other_engines():
    one = auto_split(1000, prefill_queue=0, decode_queue=0, prefill_engine_rate=250,
                     decode_work_s=1.0, max_fraction=1.0)
    assert one == 625                        # both at 250 tokens/s: 1 s of decode = 250 tokens


# ---- the router ---------------------------------------------------------------------------------
def run_router(cluster, request):
    async def consume():
        return [t async for chunk in balanced_pd(request, cluster) for t in chunk]
    return asyncio.run(consume())


@pytest.mark.parametrize("setting, split", [("0.1", 90), ("0.5", 50), ("auto", 50), (None, 50)])
def test_router_splits_by_setting(setting, split):
    dispatcher = FakeDispatcher()
    args = {} if setting is None else {"decode_fraction": setting}
    cluster = Cluster(dispatcher, {1: "prefill", 2: "decode"}, 16, args)
    request = Request("r", list(range(100)), SamplingParams(max_tokens=3))
    assert run_router(cluster, request) == [7, 7, 7]
    assert [c[:2] for c in dispatcher.calls] == [(2, "prep_recv"), (1, "remote_send"),
                                                 (2, "start_generate")]
    assert dispatcher.calls[0][2]["end"] == split and dispatcher.calls[2][2]["begin"] == split
    assert not +bpd._pending_tail and not +bpd._pending_decode      # bookkeeping balanced


def test_router_refuses_a_bad_fraction():
    cluster = Cluster(FakeDispatcher(), {1: "prefill", 2: "decode"}, 16,
                      {"decode_fraction": "lots"})
    with pytest.raises(ValueError, match="decode_fraction=lots"):
        run_router(cluster, Request("r", list(range(10)), SamplingParams(max_tokens=1)))

"""`mpiserve simulate`: routers unchanged on simulated engines with a virtual clock (pure: no
MPI, no torch)."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import subprocess
import sys
import textwrap

import pytest

from mpiserve.bench.metrics import summarize
from mpiserve.bench.workloads import WORKLOADS, Workload
from mpiserve.cluster.messages import Request
from mpiserve.engine.sampling_params import SamplingParams
from mpiserve.engine.step_shape import StepShape
from mpiserve.model.model_config import ModelConfig
from mpiserve.router.cluster import Cluster
from mpiserve.routers import BUILTIN_ROUTERS
from mpiserve.sim.fresh_router import fresh_router
from mpiserve.sim.hardware import HardwareSpec, load_hardware
from mpiserve.sim.profiled_cost import CoRunFit, ProfiledCost, StepFit, TransferFit
from mpiserve.sim.roofline_cost import RooflineCost
from mpiserve.sim.sim_dispatcher import SimDispatcher
from mpiserve.sim.sim_engine import SimEngineConfig
from mpiserve.sim.simulation import SimLayout, SimRequest, simulate
from mpiserve.sim.virtual_loop import VirtualClockLoop
from mpiserve.sim.workload_input import workload_requests

# 10 ms a step + 1 ms per prefill token + 2 ms per decode sequence: slow enough that arrivals
# a few hundred ms apart overlap
COST = ProfiledCost(StepFit(0.01, 1e-3, 2e-3, 0.0), TransferFit(1e-3, 1e-9),
                    kv_bytes_per_token=1000, pages=2048)
CONFIG = SimEngineConfig(page_size=16, num_pages=2048, max_batch_tokens=512, vocab_size=1000)
SMALL = Workload("small", 300, 8, 0.2, rates=(2.0,))


def requests(rate=2.0, count=12, workload=SMALL, seed=7):
    return workload_requests(workload, rate, count, seed, CONFIG.vocab_size)


def run(router, reqs, prefill=1, decode=1, args=None, cost=COST, config=CONFIG):
    return simulate(reqs, fresh_router(router), router, SimLayout(prefill, decode), cost,
                    config, args)


def completed(result):
    return {r["custom_id"]: r["response"]["body"] for r in result.records
            if r.get("error") is None}


@pytest.mark.parametrize("router", sorted(BUILTIN_ROUTERS))
def test_every_builtin_router_serves_each_request_once_in_full(router):
    reqs = requests()
    result = run(router, reqs)
    assert result.failure is None
    assert sorted(r["custom_id"] for r in result.records) == sorted(r.custom_id for r in reqs)
    bodies = completed(result)
    for r in reqs:
        assert bodies[r.custom_id]["usage"]["completion_tokens"] == r.params.max_tokens
        assert bodies[r.custom_id]["metrics"]["jct"] > 0


def test_control_latency_delays_each_message_between_rank_0_and_an_engine():
    """One request on an idle engine: its call and its first token each cross the wire once;
    under pd, every router call does (and still serves every request in full)."""
    latency = 0.025
    delayed = dataclasses.replace(CONFIG, control_latency_s=latency)
    lone = requests(count=1)
    at_once, late = run("round_robin", lone), run("round_robin", lone, config=delayed)
    ttft = [completed(r)[lone[0].custom_id]["metrics"]["ttft"] for r in (at_once, late)]
    assert ttft[1] == pytest.approx(ttft[0] + 2 * latency)
    reqs = requests()
    base, slow = run("pd", reqs), run("pd", reqs, config=delayed)
    assert slow.failure is None and len(completed(slow)) == len(reqs)
    for r in reqs:                       # prep_recv, remote_send, start_generate, then a token
        assert (completed(slow)[r.custom_id]["metrics"]["ttft"]
                >= completed(base)[r.custom_id]["metrics"]["ttft"] + 4 * latency - 1e-9)


def test_a_negative_control_latency_is_refused_by_name():
    done = subprocess.run([sys.executable, "-m", "mpiserve.cli", "simulate",
                           "--control-latency", "-0.1"], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2
    assert "argument --control-latency: '-0.1': use a number of seconds >= 0" in done.stderr


def test_the_garbage_collector_is_left_as_it_was_found():
    before = gc.get_threshold(), gc.get_freeze_count()
    result = run("pd", requests())
    assert result.failure is None
    assert (gc.get_threshold(), gc.get_freeze_count()) == before


def test_same_seed_repeats_exactly_and_round_robin_starts_afresh():
    reqs = requests()
    first, second = run("round_robin", reqs), run("round_robin", reqs)
    assert first.records == second.records


def test_a_user_router_file_runs(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(textwrap.dedent("""
        async def last_engine(request, cluster):
            engine = cluster.engines[-1]
            cluster.note_strategy(request, "last")
            async for tokens in engine.start_generate(request):
                yield tokens
    """))
    reqs = requests(count=5)
    result = simulate(reqs, fresh_router(f"{path}:last_engine"), "mine", SimLayout(1, 2), COST,
                      CONFIG)
    assert result.strategies == {"last": 5}
    ranks = {rank: stats["requests_done"] for rank, stats in result.engine_stats.items()}
    assert ranks == {1: 0, 2: 0, 3: 5}


def test_virtual_time_is_not_wall_time():
    loop = VirtualClockLoop()

    async def sleeper():
        await asyncio.sleep(3600)
        try:
            await asyncio.wait_for(asyncio.Event().wait(), 10)
        except asyncio.TimeoutError:
            pass
        return asyncio.get_running_loop().time()
    try:
        assert loop.run_until_complete(sleeper()) == pytest.approx(3610)
    finally:
        loop.close()


@pytest.mark.parametrize("debug", [False, True])
def test_a_cancelled_timer_never_runs(debug):
    """(A queue that holds a cancelled timer, and debug mode, take asyncio's own loop turn.)"""
    loop = VirtualClockLoop()
    loop.set_debug(debug)
    ran = []

    async def main():
        loop.call_later(5, ran.append, "cancelled").cancel()
        loop.call_later(7, ran.append, "kept")
        await asyncio.sleep(10)
        return loop.time()
    try:
        assert loop.run_until_complete(main()) == pytest.approx(10)
        assert ran == ["kept"]
    finally:
        loop.close()


def test_a_thousand_requests_take_simulated_minutes():
    reqs = requests(rate=5.0, count=1000, workload=Workload("tiny", 40, 4, 0.5))
    result = run("round_robin", reqs, prefill=2, decode=2)
    assert len(completed(result)) == 1000
    assert result.virtual_s > 150        # the last of 1000 arrivals at 5/s comes near 200 s


def test_pd_moves_kv_between_engines():
    reqs = requests(count=6)
    result = run("pd", reqs)
    sent = result.engine_stats[1]["kv_bytes_sent"]
    received = result.engine_stats[2]["kv_bytes_received"]
    # the decode engine receives every prompt but its last position
    assert sent == received == sum(len(r.prompt) - 1 for r in reqs) * COST.kv_bytes_per_token
    assert all(m["metrics"]["kv_bytes"] > 0 for m in completed(result).values())
    assert result.engine_stats[2]["fallbacks"] == 0


def test_round_robin_moves_no_kv():
    result = run("round_robin", requests(count=6))
    assert all(s["kv_bytes_sent"] == 0 for s in result.engine_stats.values())


@pytest.mark.parametrize("router", ["round_robin", "pd"])
def test_a_higher_rate_never_lowers_mean_ttft(router):
    """TTFT here counts the wait for the engines: queueing, from the arrival on."""
    def mean_ttft(rate):
        reqs = requests(rate=rate, count=24)
        result = run(router, reqs)
        return summarize(result.records, {r.custom_id: r.arrival_s for r in reqs})["mean_ttft"]
    ttfts = [mean_ttft(rate) for rate in (0.5, 2.0, 8.0, 32.0)]
    assert ttfts == sorted(ttfts)
    assert ttfts[-1] > 2 * ttfts[0]


def test_engines_report_speed_the_routers_can_read():
    reqs = requests(count=12)
    result = run("balanced_pd", reqs, args={"decode_fraction": "auto"})
    stats = result.engine_stats[1]
    assert stats["simulated"] and stats["busy_s"] > 0 and stats["prefill_tokens"] > 0


# ---- the analytic model, by hand ---------------------------------------------------------
TOY = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 1000, "hidden_size": 64,
                             "intermediate_size": 128, "num_hidden_layers": 2,
                             "num_attention_heads": 4, "num_key_value_heads": 2,
                             "torch_dtype": "bfloat16"})
UNIT = HardwareSpec("unit", bf16_flops=1e9, fp8_flops=2e9, hbm_bytes_per_s=1e6,
                    hbm_bytes=1e9, allreduce_bytes_per_s=1e6, allreduce_latency_s=1e-3,
                    kv_bytes_per_s=1e6, kv_latency_s=1e-3, compute_efficiency=1.0,
                    memory_efficiency=1.0)


def test_roofline_counts_by_hand():
    cost = RooflineCost(TOY, UNIT, "bf16")
    # per layer: q 64*64, k and v 64*32 each, o 64*64 = 12288; MLP 3*64*128 = 24576
    assert cost.linear_params == 2 * (12288 + 24576) == 73728
    assert cost.kv_bytes_per_token == 2 * 2 * 2 * 16 * 2 == 256
    assert cost.weight_bytes == 73728 * 2 + 64 * 1000 * 2 == 275456
    # one decode sequence at context 100: memory bound
    shape = StepShape(prefill_tokens=0, decode_seqs=1, context_tokens=100,
                      attention_pairs=100, sampled=1)
    memory = (275456 + 101 * 256) / 1e6
    compute = (2 * 73728 + 2 * 64000 + 4 * 100 * 64 * 2) / 1e9
    assert cost.memory_s(shape, 1) == pytest.approx(memory)
    assert cost.compute_s(shape, 1) == pytest.approx(compute)
    assert cost.step_time(shape, 1) == pytest.approx(max(memory, compute))


def test_roofline_tp_and_fp8_by_hand():
    bf16, fp8 = RooflineCost(TOY, UNIT, "bf16"), RooflineCost(TOY, UNIT, "fp8")
    shape = StepShape(prefill_tokens=1000, context_tokens=1000, attention_pairs=500500,
                      sampled=1)
    linear = 2 * 1000 * 73728
    other = 2 * 64000 + 4 * 500500 * 64 * 2
    assert bf16.compute_s(shape, 1) == pytest.approx((linear + other) / 1e9)
    assert fp8.compute_s(shape, 1) == pytest.approx(linear / 2e9 + other / 1e9)
    assert fp8.weight_bytes == 73728 + 128000
    # TP 2: half the work per device, plus 2 all-reduces per layer of 1000*64*2 bytes, each
    # a ring of 2 steps of (1 ms + 128000 / (2 * 1e6) s)
    assert bf16.allreduce_s(shape, 2) == pytest.approx(2 * 2 * 2 * (1e-3 + 0.064))
    assert bf16.step_time(shape, 2) == pytest.approx(
        max(bf16.compute_s(shape, 1) / 2, bf16.memory_s(shape, 1) / 2)
        + bf16.allreduce_s(shape, 2))
    assert bf16.kv_transfer_time(2_000_000, 2, 4) == pytest.approx(1e-3 + 1.0)


def test_builtin_hardware_and_a_user_file(tmp_path):
    assert load_hardware("h100").fp8_flops == 2 * load_hardware("h100").bf16_flops
    assert load_hardware("a100").flops("fp8") == load_hardware("a100").bf16_flops
    assert load_hardware("h200").hbm_bytes_per_s > load_hardware("h100").hbm_bytes_per_s
    path = tmp_path / "slow.json"
    path.write_text(json.dumps({"base": "h100", "hbm_bytes_per_s": 1e12}))
    spec = load_hardware(str(path))
    assert (spec.name, spec.hbm_bytes_per_s, spec.bf16_flops) == ("slow", 1e12, 989.5e12)


def test_profile_round_trips_through_json():
    again = ProfiledCost.from_json(json.loads(json.dumps(COST.to_json())))
    assert again == COST
    shape = StepShape(prefill_tokens=100, decode_seqs=3, context_tokens=500)
    assert again.step_time(shape) == pytest.approx(0.01 + 0.1 + 0.006)
    shared = dataclasses.replace(COST, co_run=CoRunFit(prefill=1.2, rest=1.5))
    assert ProfiledCost.from_json(json.loads(json.dumps(shared.to_json()))) == shared
    older = {k: v for k, v in COST.to_json().items() if k != "co_run"}
    assert ProfiledCost.from_json(older).co_run == CoRunFit(1.0, 1.0)
    # 0.1 s of the step is prefill (x 1.2 beside a neighbour), 0.016 s the rest (x 1.5)
    assert shared.co_run_slowdown(shape) == pytest.approx((0.2 * 0.1 + 0.5 * 0.016) / 0.116)


# 0.1 s a step, whatever it computes; beside a neighbour mid-step, 1.5 times as long
SHARED = ProfiledCost(StepFit(0.1, 0.0, 0.0, 0.0), TransferFit(0.0, 0.0), kv_bytes_per_token=1,
                      pages=2048, co_run=CoRunFit(prefill=1.0, rest=1.5))


@pytest.mark.parametrize("per_host", [1, 2])
def test_engines_on_one_host_share_it_step_by_step(per_host):
    """Two one-step requests, one on each engine, 0.05 s apart. Apart: each takes 0.1 s.
    On one host: the first runs alone for 0.05 s (half its work), then both run at 1/1.5 speed
    until it finishes its other half at 0.125 s; by then the second has done 0.05 s of work
    and does the rest alone, finishing at 0.175 s: 0.125 s after arriving, as the first."""
    once = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    reqs = [SimRequest(name, [5], once, at) for name, at in (("a", 0.0), ("b", 0.05))]
    config = dataclasses.replace(CONFIG, engines_per_host=per_host)
    result = run("round_robin", reqs, cost=SHARED, config=config)
    jct = {name: body["metrics"]["jct"] for name, body in completed(result).items()}
    expected = 0.1 if per_host == 1 else 0.125
    assert jct == {"a": pytest.approx(expected), "b": pytest.approx(expected)}
    busy = sorted(stats["busy_s"] for stats in result.engine_stats.values())
    assert busy == [pytest.approx(expected)] * 2


# ---- the command ---------------------------------------------------------------------------
def test_cli_writes_simulated_rows_beside_measured_ones(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text(json.dumps(COST.to_json()))
    argv = [sys.executable, "-m", "mpiserve.cli", "simulate", "--workload", "chat", "--routers",
            "round_robin,pd", "--rates", "4", "--requests", "10", "--profile", str(profile),
            "--out", str(tmp_path)]
    first = subprocess.run(argv, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    rows = json.loads((tmp_path / "strategies.json").read_text())
    assert [(r["router"], r["simulated"], r["completed"]) for r in rows] == [
        ("round_robin", True, 10), ("pd", True, 10)]
    assert all(r["mean_jct"] > r["mean_ttft"] > 0 for r in rows)
    measured = {k: v for k, v in rows[1].items() if k != "simulated"} | {"mean_jct": 123.0}
    (tmp_path / "strategies.json").write_text(json.dumps([measured]))
    again = subprocess.run(argv, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    rows = json.loads((tmp_path / "strategies.json").read_text())
    assert rows[0] == measured and len(rows) == 3       # the measured pd row stays beside
    table = (tmp_path / "strategies.md").read_text()
    assert "| pd (simulated) | 4 |" in table and "| pd | 4 |" in table


def test_simulation_imports_no_torch():
    code = ("import sys; from mpiserve.sim.simulate_command import main; "
            "from mpiserve.routers import BUILTIN_ROUTERS; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_workloads_match_the_benchmark():
    reqs = workload_requests(WORKLOADS["long"], 0.2, 4, 1, 1000)
    assert all(r.params.ignore_eos and r.params.temperature == 0 for r in reqs)
    assert reqs[0].arrival_s == 0.0 and reqs[-1].arrival_s > 0


def test_reservations_on_counts_the_requests_in_flight():
    cluster = Cluster(SimDispatcher(), {1: "prefill", 2: "decode"}, 16)
    a, b = (Request(name, [5, 6], SamplingParams(max_tokens=2)) for name in "ab")
    ta, tb = cluster.trace(a), cluster.trace(b)
    for request, trace, rank in [(a, ta, 2), (a, ta, 2), (b, tb, 2), (b, tb, 1)]:
        cluster.set_reserved(request, trace, rank, True)
    assert (cluster.reservations_on(1), cluster.reservations_on(2)) == (1, 2)
    cluster.set_reserved(b, tb, 1, False)
    cluster.pop_trace(a)
    assert (cluster.reservations_on(1), cluster.reservations_on(2)) == (0, 1)
    cluster.set_reserved(a, ta, 2, False)            # a finished request's trace counts no more
    assert cluster.reservations_on(2) == 1 and ta.reserved == set()

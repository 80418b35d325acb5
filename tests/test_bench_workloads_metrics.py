"""Serving benchmark helpers: seeded workloads with Poisson arrivals, vLLM-style metrics from
output records, router specs and the merged reports (pure, no MPI)."""

import json
import random
import statistics

import pytest

from mpiserve.batch.input_file import read_batch
from mpiserve.bench.metrics import percentile, summarize
from mpiserve.bench.serving import (
    RouterRun,
    markdown,
    merge_rows,
    parse_rates,
    parse_routers,
    run_arguments,
)
from mpiserve.bench.workloads import (
    FIRST_TOKEN_ID,
    QUICK_WORKLOADS,
    WARMUP_PREFIX,
    WORKLOADS,
    batch_record,
    make_requests,
    poisson_arrivals,
    with_warmup,
)


# ---- workloads ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_lengths_stay_within_the_spread(name):
    w = WORKLOADS[name]
    requests = make_requests(w, 1.0, 64, seed=1, token_limit=2048)
    assert len(requests) == 64 and len({r.custom_id for r in requests}) == 64
    for r in requests:
        own = len(r.prompt) - w.shared_prefix_len
        assert w.prompt_len * (1 - w.spread) - 1 <= own <= w.prompt_len * (1 + w.spread) + 1
        low, high = w.output_len * (1 - w.spread), w.output_len * (1 + w.spread)
        assert low - 1 <= r.max_tokens <= high + 1
        assert all(FIRST_TOKEN_ID <= t < 2048 for t in r.prompt)
        assert len(r.prompt) + r.max_tokens <= 4096


def test_long_prompts_are_about_2000_tokens():
    requests = make_requests(WORKLOADS["long"], 0.2, 200, seed=3, token_limit=2048)
    assert 1950 <= statistics.mean(len(r.prompt) for r in requests) <= 2050
    assert 30 <= statistics.mean(r.max_tokens for r in requests) <= 34


def test_shared_prefix_requests_share_the_system_prompt():
    w = WORKLOADS["shared_prefix"]
    requests = make_requests(w, 1.0, 10, seed=5, token_limit=2048)
    prefix = requests[0].prompt[:w.shared_prefix_len]
    assert all(r.prompt[:w.shared_prefix_len] == prefix for r in requests)
    assert len({tuple(r.prompt[w.shared_prefix_len:]) for r in requests}) == 10


def test_same_seed_same_requests_and_rates_share_prompts():
    w = WORKLOADS["chat"]
    a = make_requests(w, 1.0, 20, seed=9, token_limit=2048)
    b = make_requests(w, 1.0, 20, seed=9, token_limit=2048)
    c = make_requests(w, 2.0, 20, seed=9, token_limit=2048)
    d = make_requests(w, 1.0, 20, seed=10, token_limit=2048)
    assert a == b
    assert [r.prompt for r in a] == [r.prompt for r in c]
    assert [r.arrival_s for r in a] != [r.arrival_s for r in c]
    assert [r.prompt for r in a] != [r.prompt for r in d]


def test_poisson_arrivals_have_the_rate():
    times = poisson_arrivals(4000, 2.0, random.Random(0))
    assert times[0] == 0.0 and times == sorted(times)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert statistics.mean(gaps) == pytest.approx(0.5, rel=0.06)
    assert statistics.stdev(gaps) == pytest.approx(0.5, rel=0.1)     # exponential: sd == mean
    with pytest.raises(ValueError):
        poisson_arrivals(3, 0.0, random.Random(0))


def test_warmup_comes_first_and_shifts_the_rest():
    requests = make_requests(WORKLOADS["chat"], 1.0, 5, seed=1, token_limit=2048)
    both = with_warmup(requests, 2, 3.0, 2048)
    assert [r.custom_id for r in both[:2]] == [f"{WARMUP_PREFIX}0", f"{WARMUP_PREFIX}1"]
    assert all(r.arrival_s == 0.0 and len(r.prompt) > 16 for r in both[:2])
    assert [r.arrival_s for r in both[2:]] == [round(r.arrival_s + 3.0, 3) for r in requests]
    assert [r.prompt for r in both[2:]] == [r.prompt for r in requests]


def test_batch_records_are_valid_input(tmp_path):
    requests = make_requests(QUICK_WORKLOADS["long"], 4.0, 5, seed=1, token_limit=2048)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(batch_record(r)) + "\n" for r in requests))
    items = list(read_batch(path))
    assert [i.error for i in items] == [None] * 5
    assert [i.arrival_s for i in items] == [r.arrival_s for r in requests]
    assert all(i.params.ignore_eos and i.params.temperature == 0 for i in items)
    assert [i.params.max_tokens for i in items] == [r.max_tokens for r in requests]


# ---- metrics ------------------------------------------------------------------------------------
def record(custom_id, ttft, tpot, jct, tokens, prompt=10, itl=None):
    metrics = {"ttft": ttft, "tpot": tpot, "jct": jct, "queue_time": 0.0, "strategy": "pd"}
    if itl is not None:
        metrics["itl"] = itl
    body = {"usage": {"prompt_tokens": prompt, "completion_tokens": tokens}, "metrics": metrics}
    return {"custom_id": custom_id, "error": None,
            "response": {"status_code": 200, "body": body}}


def test_percentile_interpolates_like_numpy():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(list(range(101)), 99) == pytest.approx(99.0)
    assert percentile([1, 2], 99) == pytest.approx(1.99)


def test_summarize_run():
    records = [record("a", 1.0, 0.1, 2.0, 11, itl=[0.1] * 10),
               record("b", 3.0, 0.3, 6.0, 11, itl=[0.3] * 10),
               record("c", 0.5, None, 0.5, 1, itl=[]),
               {"custom_id": "d", "error": {"code": "router_error", "message": "x"},
                "response": None}]
    arrivals = {"a": 0.0, "b": 1.0, "c": 9.5, "d": 2.0}
    s = summarize(records, arrivals, slo_ttft=2.0, slo_tpot=0.2)
    assert (s["completed"], s["failed"]) == (3, 1)
    assert s["duration_s"] == pytest.approx(10.0)                   # 0 -> 9.5 + 0.5
    assert s["throughput"] == pytest.approx(0.3)
    assert s["output_throughput"] == pytest.approx(2.3)
    assert s["total_token_throughput"] == pytest.approx(5.3)
    assert s["goodput"] == pytest.approx(0.2)                       # a and c (c: no TPOT)
    assert s["mean_ttft"] == pytest.approx(1.5) and s["p50_ttft"] == pytest.approx(1.0)
    assert s["mean_tpot"] == pytest.approx(0.2)                     # c has no TPOT
    assert s["mean_itl"] == pytest.approx(0.2) and s["p99_itl"] == pytest.approx(0.3)
    assert s["mean_jct"] == pytest.approx(8.5 / 3) and s["p99_jct"] == pytest.approx(5.92)
    assert s["strategies"] == {"pd": 3}


def test_summarize_without_itl_or_slos():
    s = summarize([record("a", 1.0, 0.1, 2.0, 5)], {"a": 0.0})
    assert s["mean_itl"] is None and s["goodput"] == pytest.approx(0.5)
    assert summarize([], {})["throughput"] is None


# ---- serving helpers ----------------------------------------------------------------------------
def test_router_specs():
    runs = parse_routers("round_robin, balanced_pd:0.1,balanced_pd:auto,my/r.py:route")
    assert runs == [RouterRun("round_robin", "round_robin", ()),
                    RouterRun("balanced_pd:0.1", "balanced_pd", ("decode_fraction=0.1",)),
                    RouterRun("balanced_pd:auto", "balanced_pd", ("decode_fraction=auto",)),
                    RouterRun("my/r.py:route", "my/r.py:route", ())]
    for bad in ("", "balanced_pd:2", "balanced_pd:lots"):
        with pytest.raises(ValueError):
            parse_routers(bad)
    assert parse_rates("0.5,2") == [0.5, 2.0]
    for bad in ("", "0", "-1", "inf"):
        with pytest.raises(ValueError):
            parse_rates(bad)


def test_run_arguments():
    args = run_arguments(RouterRun("balanced_pd:auto", "balanced_pd", ("decode_fraction=auto",)),
                         1, 2, "M", "in", "out", ["--kv-cache-gib=1"])
    assert args[:7] == ["run", "--prefill", "1", "--decode", "2", "--router", "balanced_pd"]
    assert args[7:9] == ["--router-arg", "decode_fraction=auto"]
    assert "--record-itl" in args and args[-1] == "--kv-cache-gib=1"


def row(workload, router, rate, **extra):
    base = {"workload": workload, "router": router, "rate": rate, "throughput": 1.0,
            "goodput": 1.0, "mean_ttft": 0.1, "p99_ttft": 0.2, "mean_tpot": 0.01,
            "mean_itl": 0.01, "p99_itl": 0.02, "mean_jct": 1.0, "p50_jct": 1.0, "p99_jct": 2.0,
            "completed": 4, "num_requests": 4, "command": f"mpiserve bench --workload {workload}",
            "run_command": "mpiexec -n 3 mpiserve run", "prefill": 1, "decode": 1,
            "model": "m", "slo_ttft": 1.0, "slo_tpot": 0.1, "quick": False}
    return {**base, **extra}


def test_reports_replace_only_what_was_measured_again(tmp_path):
    path = tmp_path / "strategies.json"
    path.write_text(json.dumps([row("long", "pd", 0.1), row("chat", "pd", 1.0),
                                row("chat", "round_robin", 2.0, mean_jct=9.0)]))
    merged = merge_rows(path, "chat", [row("chat", "round_robin", 2.0, mean_ttft=None)])
    assert [(r["workload"], r["router"]) for r in merged] == [
        ("long", "pd"), ("chat", "pd"), ("chat", "round_robin")]
    assert merged[-1]["mean_jct"] == 1.0
    md = markdown(merged)
    assert "## long" in md and "## chat" in md and "`mpiserve bench --workload chat`" in md
    assert "| round_robin | 2 |" in md and "–" in md

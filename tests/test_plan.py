"""`mpiserve plan`: every P:D split and TP size for a number of devices, simulated (pure: no
MPI, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from mpiserve.sim.plan_command import best_layouts, layouts, main
from mpiserve.sim.profiled_cost import ProfiledCost, StepFit, TransferFit

# prefill is dear (0.1 ms a prompt token: 0.2 s for a `long` prompt), decode nearly free
PREFILL_BOUND = ProfiledCost(StepFit(1e-3, 1e-4, 1e-5, 0.0), TransferFit(1e-4, 1e-10),
                             kv_bytes_per_token=1000, pages=4096, vocab_size=1000,
                             max_model_len=4096)


@pytest.fixture
def profile(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(PREFILL_BOUND.to_json()))
    return str(path)


@pytest.mark.parametrize("devices", [1, 6, 8])
def test_layouts_use_every_device_and_keep_a_decode_engine(devices):
    found = [layout for tp in (1, 2, 4, 8) for layout in layouts(devices, tp)]
    assert all((x.prefill + x.decode) * x.tp == devices and x.decode >= 1 for x in found)
    assert len(found) == len(set(found)) == sum(devices // tp for tp in (1, 2, 4, 8)
                                                if devices % tp == 0)
    assert layouts(6, 4) == []


def test_best_layout_is_the_fastest_complete_one():
    rows = [{"router": "pd", "rate": 1.0, "completed": 3, "num_requests": 4, "mean_jct": 0.1},
            {"router": "pd", "rate": 1.0, "completed": 4, "num_requests": 4, "mean_jct": 0.5},
            {"router": "pd", "rate": 1.0, "completed": 4, "num_requests": 4, "mean_jct": 0.3}]
    assert best_layouts(rows) == [rows[2]]


def test_pd_takes_more_prefill_engines_when_prefill_is_the_bottleneck(profile, tmp_path):
    """12 prompts of ~2,000 tokens a second need 2.4 prefill engine-seconds a second: one or
    two prefill engines fall behind, three keep up; the single decode engine is nearly idle."""
    code = main(["--devices", "4", "--tp-options", "1,2", "--workload", "long", "--routers",
                 "pd,round_robin", "--rates", "12", "--requests", "24", "--profile", profile,
                 "--out", str(tmp_path)])
    assert code == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    best = {r["router"]: (r["prefill"], r["decode"], r["tp"]) for r in plan["best"]}
    assert best["pd"] == (3, 1, 1)
    assert any("TP 2" in line for line in plan["skipped"])     # the profile measured TP 1
    pd = {r["prefill"]: r["mean_jct"] for r in plan["layouts"] if r["router"] == "pd"}
    assert sorted(pd) == [1, 2, 3] and pd[1] > pd[2] > pd[3]
    assert {r["prefill"] for r in plan["layouts"] if r["router"] == "round_robin"} == {
        0, 1, 2, 3}


def test_cli_writes_plan_json(profile, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mpiserve.cli", "plan", "--devices", "2",
                           "--tp-options", "1", "--workload", "chat", "--routers", "pd",
                           "--rates", "4", "--requests", "6", "--profile", profile,
                           "--out", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    plan = json.loads((out / "plan.json").read_text())
    assert plan["devices"] == 2 and plan["command"].startswith("mpiserve plan --devices 2")
    assert [(r["prefill"], r["decode"], r["tp"]) for r in plan["layouts"]] == [(1, 1, 1)]
    assert plan["best"] == plan["layouts"] and plan["best"][0]["completed"] == 6
    assert "| pd | 4 | 1P + 1D, TP 1 |" in done.stdout
    assert "no prefill engine" in done.stderr

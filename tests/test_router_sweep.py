"""`python -m mpiserve.bench.router_sweep`: every point of the sweep holds each fixed router's
mean JCT and each candidate's ratio to the best of them (a short run: 1 seed, 6 requests)."""

from __future__ import annotations

import json

from mpiserve.bench.router_sweep import FIXED, POINTS, main
from mpiserve.sim.profiled_cost import ProfiledCost, StepFit, TransferFit


def test_sweep_compares_each_candidate_with_the_best_fixed_router(tmp_path):
    profile = tmp_path / "profile.json"
    cost = ProfiledCost(StepFit(0.01, 1e-4, 2e-3, 0.0), TransferFit(1e-3, 1e-9),
                        kv_bytes_per_token=1000, pages=4096, vocab_size=1000,
                        max_model_len=4096, source="test profile")
    profile.write_text(json.dumps(cost.to_json()))
    assert main(["--profile", str(profile), "--seeds", "1", "--requests", "6",
                 "--candidates", "adaptive,round_robin", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "router_sweep.json").read_text())
    assert [(p["workload"], p["rate"]) for p in report["points"]] == \
        [(w, r) for w, rates in POINTS.items() for r in rates]
    for point in report["points"]:
        jct = point["mean_jct"]
        assert set(FIXED) | {"adaptive"} <= set(jct) and all(v > 0 for v in jct.values())
        assert point["best_fixed"] == min(FIXED, key=jct.get)
        ratios = point["ratio_to_best_fixed"]
        assert ratios["adaptive"] == jct["adaptive"] / jct[point["best_fixed"]]
        assert ratios["round_robin"] >= 1.0           # a fixed router never beats the best
    assert "| long | 0.2 |" in (tmp_path / "router_sweep.md").read_text()

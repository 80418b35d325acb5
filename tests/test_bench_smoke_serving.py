"""Smoke test of the serving benchmark: `mpiserve bench --quick` runs two routers end to end (real
mpiexec jobs on a tiny model) and writes well-formed reports. No timing assertions."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

MPISERVE = Path(sys.executable).parent / "mpiserve"
REQUIRED = {"workload": str, "router": str, "rate": float, "mean_jct": float, "p99_jct": float,
            "mean_ttft": float, "mean_tpot": float, "throughput": float}
POSITIVE = ("mean_jct", "p99_jct", "p50_jct", "mean_ttft", "p50_ttft", "p99_ttft", "throughput",
            "output_throughput", "total_token_throughput", "duration_s", "rate")
NON_NEGATIVE = ("mean_tpot", "p50_tpot", "p99_tpot", "mean_itl", "p50_itl", "p99_itl",
                "goodput")


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(600)
def test_bench_quick_writes_reports(tmp_path):
    out = tmp_path / "results"
    command = [str(MPISERVE), "bench", "--quick", "--routers", "round_robin,balanced_pd:auto",
               "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=580, cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]

    rows = json.loads((out / "strategies.json").read_text())
    assert [r["router"] for r in rows] == ["round_robin", "balanced_pd:auto"]
    for row in rows:
        for key, kind in REQUIRED.items():
            assert isinstance(row[key], kind), (key, row[key])
        for key in POSITIVE:
            assert row[key] > 0, (key, row)
        for key in NON_NEGATIVE:
            assert isinstance(row[key], float) and row[key] >= 0, (key, row)
        assert row["workload"] == "long" and row["quick"] is True
        assert row["completed"] == row["num_requests"] and row["failed"] == 0
        assert row["p99_jct"] >= row["p50_jct"] and row["exit_code"] == 0
        assert row["command"].startswith("mpiserve bench --quick")
        assert row["run_command"].startswith("mpiexec -n 3 mpiserve run")
    assert rows[1]["strategies"] == {"balanced_pd": rows[1]["num_requests"]}

    md = (out / "strategies.md").read_text()
    assert "## long" in md and "`mpiserve bench --quick" in md
    assert "| round_robin |" in md and "| balanced_pd:auto |" in md
    png = (out / "strategies_long.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 1000

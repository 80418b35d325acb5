"""Smoke tests of the KV path, idle-cost and tensor-parallel benchmarks (`--quick`: tiny
model, seconds long): they run end to end and write well-formed JSON. No timing assertions."""

import json
import subprocess
import sys

import pytest

pytest.importorskip("transformers")


def run_module(module, out, *extra):
    done = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out), *extra],
                          capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stdout + done.stderr[-6000:]
    return done


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_kv_path_quick(tmp_path):
    run_module("mpiserve.bench.kv_path", tmp_path)
    result = json.loads((tmp_path / "kv_path.json").read_text())
    assert result["quick"] is True and result["bandwidth"]
    for row in result["bandwidth"]:
        for key in ("tokens", "bytes", "real_s", "raw_s", "real_gb_per_s", "raw_gb_per_s",
                    "ratio"):
            assert isinstance(row[key], (int, float)) and row[key] > 0, (key, row)
        assert row["bytes"] == row["tokens"] * result["kv_bytes_per_token"]
    overlap = result["overlap"]
    for key in ("t_prefill_s", "t_transfer_s", "t_streamed_s", "t_sequential_s"):
        assert overlap[key] > 0, (key, overlap)
    assert isinstance(overlap["hidden_share"], float)
    assert "| real / raw |" in (tmp_path / "kv_path.md").read_text()


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_idle_quick(tmp_path):
    run_module("mpiserve.bench.idle", tmp_path)
    result = json.loads((tmp_path / "idle.json").read_text())
    assert sorted(result["cpu_share_per_rank"]) == ["0", "1", "2"]
    assert all(0 <= share < 1.5 for share in result["cpu_share_per_rank"].values())
    assert result["request_served_during_window"] is False
    assert result["job_exit_code"] in (0, 3) and result["window_s"] == 3.0


@pytest.mark.slow
@pytest.mark.mpi
@pytest.mark.timeout(300)
def test_tensor_parallel_quick(tmp_path):
    run_module("mpiserve.bench.tensor_parallel", tmp_path)
    result = json.loads((tmp_path / "tensor_parallel.json").read_text())
    assert result["tp1"]["step_s"] > 0 and result["tp2"]["step_s"] > 0
    assert 0 < result["collective_share"] < 1
    assert len(result["tp2"]["weight_bytes"]) == 2 and result["weight_ratio"] < 0.6
    assert result["greedy_tokens_identical"] is True

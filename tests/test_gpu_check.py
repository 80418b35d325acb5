"""The prepared GPU check runs every step on CPU (`--device cpu --quick`), so it cannot rot
between the runs on a GPU machine; without a GPU the default device stops with a clear message.
The host-cost benchmark, which shares its generate calls, runs once too."""

import json
import subprocess
import sys

import pytest
import torch

from mpiserve.bench import gpu_check


def test_cpu_quick_run_writes_every_section(tmp_path):
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--device", "cpu", "--quick", "--out", str(out)])
    result = json.loads(out.read_text())
    greedy = result["greedy"]
    assert greedy["prompts"] == 4
    assert greedy["first_token_identical"] == 4, greedy
    assert result["throughput"]["mpiserve"]["tokens_per_s"] > 0
    assert result["throughput"]["transformers"]["tokens_per_s"] > 0
    profile = result["throughput"]["mpiserve"]["profile"]
    assert profile["device_kernels_s"] is None and profile["wall_s"] > 0
    functions = [row["function"] for row in profile["host_functions"]]
    assert any("llm.py" in name and "generate" in name for name in functions), functions
    # the products show whichever path takes them (oneDNN's op, or the numba panel kernel,
    # which is no torch op): the host profile always passes through linear_weight.linear
    assert any("linear_weight.py" in name and "(linear)" in name for name in functions), functions
    assert profile["ops_by_host_time"] and all(row["op"] for row in profile["ops_by_host_time"])
    assert result["kernel_path"] == "numba CPU kernel"
    (row,) = result["decode_attention"]
    assert row["max_abs_error"] < 1e-2, row


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_without_gpu_exits_naming_the_cause(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mpiserve.bench.gpu_check", "--out",
                           str(tmp_path / "x.json")], capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no CUDA GPU" in done.stderr
    assert not (tmp_path / "x.json").exists()


def test_host_overhead_bench_writes_both_engines_and_identical_outputs(tmp_path):
    """The host-cost benchmark shares the GPU check's two generate calls; one repeat runs."""
    from mpiserve.bench import host_overhead

    host_overhead.main(["--repeats", "1", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "host_overhead.json").read_text())
    assert result["identical_outputs"] == host_overhead.PROMPTS
    for name in ("mpiserve", "transformers"):
        assert len(result[name]["seconds"]) == 1 and result[name]["min_s"] > 0

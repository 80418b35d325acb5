"""Smoke test of the offline throughput benchmark: `--quick` runs and writes a well-formed report
(no timing assertions)."""

import json
import os
import subprocess
import sys

import pytest

from mpiserve.bench.vllm_worker import PYTHON_ENV

NUMBERS = ("mpiserve_tokens_per_s", "transformers_tokens_per_s", "ratio", "params", "prompts",
           "total_generated_tokens", "mpiserve_seconds", "transformers_seconds",
           "transformers_batch_size", "torch_threads")

pytest.importorskip("transformers")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_throughput_quick(tmp_path, mpiserve_cache):
    out = tmp_path / "results"
    done = subprocess.run(
        [sys.executable, "-m", "mpiserve.bench.engine_throughput", "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
        env={k: v for k, v in os.environ.items() if k != PYTHON_ENV})
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((out / "engine_throughput.json").read_text())
    for key in NUMBERS:
        assert isinstance(result[key], (int, float)) and not isinstance(result[key], bool), key
        assert result[key] > 0, key
    assert result["command"].startswith("python -m mpiserve.bench.engine_throughput --quick")
    assert result["quick"] is True
    assert result["mpiserve_generated_tokens"] == result["total_generated_tokens"]
    assert result["transformers_batch_size"] in [r["batch_size"]
                                                 for r in result["transformers_runs"]]
    assert len(result["correctness"]) > 0
    assert "| mpiserve |" in (out / "engine_throughput.md").read_text()
    # vLLM is not given here: skipped with the reason, mpiserve's figures still per dtype
    assert list(result["dtypes"]) == ["float32"]
    assert result["dtypes"]["float32"]["mpiserve_tokens_per_s"] > 0
    assert result["dtypes"]["float32"]["mpiserve_matmul_dtype"] == "float32"
    units = result["half_precision_units"]
    assert units is None or set(units) <= {"amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16"}
    assert "--vllm-python" in result["dtypes"]["float32"]["vllm_skipped"]
    assert result["ttft"][0]["first_s"] > 0 and result["ttft"][0]["warm_s"] > 0


def test_step_profile_quick(tmp_path, mpiserve_cache):
    """`--quick` profiles both dtypes and reports operator shares and the roofline ratio."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, "-m", "mpiserve.bench.step_profile", "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "step_profile.json").read_text())
    assert [r["dtype"] for r in report["runs"]] == ["float32", "bfloat16"]
    for run in report["runs"]:
        assert run["prefill"]["achieved_gflops"] > 0
        assert run["fp32_matmul_gflops_of_model_shapes"] > 0
        assert run["engine_matmul_gflops_of_model_shapes"] > 0
        assert run["prefill"]["top_ops"] and run["decode"]["top_ops"]
    assert "GFLOP/s" in (out / "step_profile.md").read_text()

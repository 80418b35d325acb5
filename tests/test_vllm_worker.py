"""The vLLM baseline's harness: skipped with a reason when vLLM is absent (the real vLLM run
is in the benchmark, with vLLM's own environment)."""

import sys

from mpiserve.bench.vllm_worker import PYTHON_ENV, run_vllm, vllm_python


def test_no_python_given_names_the_option_and_variable(monkeypatch):
    monkeypatch.delenv(PYTHON_ENV, raising=False)
    python, reason = vllm_python(None)
    assert python is None and "--vllm-python" in reason and PYTHON_ENV in reason


def test_missing_interpreter_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(PYTHON_ENV, str(tmp_path / "nope" / "python"))
    python, reason = vllm_python(None)
    assert python is None and str(tmp_path / "nope") in reason


def test_interpreter_without_vllm_gives_the_worker_error(tmp_path):
    reason = run_vllm(sys.executable, tmp_path, "float32", [[5, 6, 7]], [2],
                      kv_cache_gib=1, timeout_s=60)
    assert isinstance(reason, str) and "exited 1" in reason and "vllm" in reason

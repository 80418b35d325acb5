"""Heartbeats do not depend on step length: an engine busy in one prefill step far longer than
--heartbeat-timeout still counts as alive (its heartbeat thread goes on), so the job completes.
A real mpiexec job on the benchmark model (34M parameters), whose single-step prefill of a
2,000-token prompt takes several seconds on a CPU core."""

from __future__ import annotations

import json
import random

import pytest
from test_mpi_runtime import describe, mpirun, read_records

from mpiserve.bench.bench_model import BENCH, bench_model_dir

pytestmark = pytest.mark.mpi

PROMPT_TOKENS = 2000
HEARTBEAT_TIMEOUT_S = 3


def test_one_long_prefill_step_is_not_silence(tmp_path):
    prompt = random.Random(3).choices(range(3, BENCH.vocab_size), k=PROMPT_TOKENS)
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(json.dumps({
        "custom_id": "long", "method": "POST", "url": "/v1/completions",
        "body": {"prompt": prompt, "max_tokens": 2, "temperature": 0}}) + "\n")
    result = mpirun(2, "--model", bench_model_dir(BENCH), "--input", source, "--output",
                    output, "--max-batch-tokens", 4096, "--heartbeat-timeout",
                    HEARTBEAT_TIMEOUT_S, "--dashboard", "off", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    records = read_records(output)
    assert [r["custom_id"] for r in records] == ["long"], describe(result)
    assert records[0]["error"] is None, records[0]
    summary = json.loads((tmp_path / "out.run" / "summary.json").read_text())
    assert summary["engines"]["1"]["prefill_tokens"] >= PROMPT_TOKENS, summary["engines"]

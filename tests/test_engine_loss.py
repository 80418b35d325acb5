"""A frozen engine (SIGSTOP: its process lives, it answers nothing) ends the job through the
heartbeat: exit 1 within the heartbeat timeout + 5 s (asserted with a generous margin; the
figure comes from `python -m mpiserve.bench.engine_loss`), a message naming the lost rank and
its host, and whole records, one per id. Requests in flight are left for the re-run. The same
for a frozen tensor-parallel follower rank."""

from __future__ import annotations

import socket

import pytest

from mpiserve.bench.engine_loss import measure

pytestmark = pytest.mark.mpi

MARGIN_S = 20.0             # the bound is timeout + 5 s; a loaded CI machine gets slack


def test_frozen_engine_ends_the_job_naming_it(tmp_path, tiny_hf_model):
    result = measure(str(tiny_hf_model("llama")), tmp_path, heartbeat_timeout_s=5.0)
    log = (tmp_path / "job.log").read_text(errors="replace")[-4000:]
    assert result["exit_code"] == 1, log
    assert result["seconds_to_exit"] is not None, log
    assert result["seconds_to_exit"] < result["bound_s"] + MARGIN_S, (result, log)
    assert f"lost engine rank(s) 2 on host {socket.gethostname()}" in result["message"], log
    assert result["records"] == result["distinct_ids"] >= 2, result
    assert "never retrieved" not in log, log


def test_frozen_tensor_parallel_follower_ends_the_job_naming_it(tmp_path, tiny_hf_model):
    """A follower that hangs leaves its lead stuck in a collective, while the lead's heartbeat
    thread still beats: the follower's own heartbeats are what rank 0 misses."""
    result = measure(str(tiny_hf_model("llama")), tmp_path, heartbeat_timeout_s=5.0,
                     decode_tp=2)
    log = (tmp_path / "job.log").read_text(errors="replace")[-4000:]
    assert result["exit_code"] == 1, log
    assert result["seconds_to_exit"] is not None, log
    assert result["seconds_to_exit"] < result["bound_s"] + MARGIN_S, (result, log)
    assert ("lost engine rank(s) 3 (tensor-parallel rank of the engine led by rank 2)"
            in result["message"]), log
    assert result["records"] == result["distinct_ids"] >= 2, result

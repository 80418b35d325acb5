"""`mpiserve profile` on a real (tiny) engine: the samples cover every step kind the fit needs,
and the profile it writes drives `mpiserve simulate`."""

from __future__ import annotations

import json
import subprocess
import sys

from mpiserve.bench.bench_model import QUICK, bench_model_dir
from mpiserve.sim.profile_command import PREFILL_LENGTHS
from mpiserve.sim.profiled_cost import STEP_TERMS, ProfiledCost


def mpiserve(*words: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "mpiserve.cli", *words],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done


def test_profile_of_a_real_engine_drives_a_simulation(tmp_path):
    profile = tmp_path / "profile.json"
    mpiserve("profile", "--model", str(bench_model_dir(QUICK)), "--out", str(profile),
             "--repeats", "1")
    data = json.loads(profile.read_text())
    cost = ProfiledCost.load(profile)
    samples = data["samples"]
    prefill = {s["prefill_tokens"] for s in samples if not s["decode_seqs"]}
    assert set(PREFILL_LENGTHS) <= prefill                   # one step per length
    half = max(PREFILL_LENGTHS) // 2                          # the chunked prompt's 2nd chunk
    assert any(s["prefill_tokens"] == half and s["context_tokens"] == 2 * half
               for s in samples)
    assert {s["decode_seqs"] for s in samples} >= {1, 16}
    assert all(s["seconds"] > 0 for s in samples)
    fit = [getattr(cost.step, term) for term in STEP_TERMS]
    assert all(value >= 0 for value in fit) and any(value > 0 for value in fit)
    assert cost.pages > 0 and cost.kv_bytes_per_token > 0 and cost.transfer.per_byte_s > 0
    mpiserve("simulate", "--workload", "chat", "--routers", "pd", "--rates", "4",
             "--requests", "6", "--profile", str(profile), "--out", str(tmp_path))
    (row,) = json.loads((tmp_path / "strategies.json").read_text())
    assert row["simulated"] and row["completed"] == 6 and row["mean_jct"] > 0

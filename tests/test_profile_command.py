"""`mpiserve profile` on a real (tiny) engine: the samples cover every step kind the fit needs,
and the profile it writes drives `mpiserve simulate`; `--from-run` fits the step model to the
steps real jobs timed (their run directories' steps.json)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from mpiserve.bench.bench_model import QUICK, bench_model_dir
from mpiserve.dashboard.report import STEPS_FILE, write_step_timings
from mpiserve.engine.step_shape import StepShape
from mpiserve.engine.step_timings import StepTimings, samples_of
from mpiserve.sim.profile_command import PREFILL_LENGTHS, fit_step, scaled
from mpiserve.sim.profiled_cost import STEP_TERMS, ProfiledCost, StepFit, TransferFit


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
    beside = data["co_run_samples"]              # the same steps, timed beside a neighbour
    assert [_shape(s) for s in beside] == [_shape(s) for s in samples]
    assert all(s["seconds"] > 0 for s in beside)
    assert cost.co_run.prefill > 0 and cost.co_run.rest > 0
    mpiserve("simulate", "--workload", "chat", "--routers", "pd", "--rates", "4",
             "--requests", "6", "--profile", str(profile), "--out", str(tmp_path))
    (row,) = json.loads((tmp_path / "strategies.json").read_text())
    assert row["simulated"] and row["completed"] == 6 and row["mean_jct"] > 0


def _shape(sample: dict) -> tuple:
    return tuple(sample[k] for k in StepShape._fields)


# ---- --from-run: the step model fitted to steps that real jobs timed ------------------------
KNOWN = StepFit(intercept_s=0.004, per_prefill_token_s=2e-4, per_decode_seq_s=1e-3,
                per_context_token_s=5e-7, per_attention_pair_s=1e-9)


def run_dir_with_steps(path: Path, tp: int = 1, cost: StepFit = KNOWN) -> Path:
    """A run directory whose steps.json holds steps that cost exactly `cost`, as a job's rank 0
    writes it."""
    rng = random.Random(3)
    timings = StepTimings(StepShape._fields)
    for _ in range(60):
        prefill, decode = rng.choice([0, 16, 300, 1000]), rng.randrange(0, 20)
        context = prefill + decode * rng.randrange(10, 900)
        shape = StepShape(prefill, decode, context, prefill * prefill // 2 + context, decode)
        timings.add(shape, cost(shape))
    stats = {1: {"role": "decode", "host": "h", "tp": tp, "step_timings": timings.to_json()}}
    path.mkdir()
    assert write_step_timings(path / STEPS_FILE, stats)
    return path


def test_the_step_fit_leaves_out_a_step_that_paused_and_recovers_the_model():
    """Steps timed exactly as KNOWN costs them, but one single-sequence decode step took 10x
    (the process was descheduled): the fit recovers KNOWN, as it would without that step."""
    rng = random.Random(5)
    shapes = [StepShape(p, 0, p, p * p // 2, 0)
              for p in [rng.choice([16, 128, 512, 1024]) for _ in range(8)]]
    shapes += [StepShape(0, d, d * c, d * c, d)
               for d, c in [(rng.choice([1, 4, 16]), rng.choice([64, 512, 1024]))
                            for _ in range(12)]]
    samples = [{**shape._asdict(), "seconds": KNOWN(shape)} for shape in shapes]
    paused = StepShape(0, 1, 64, 64, 1)
    samples.append({**paused._asdict(), "seconds": 10 * KNOWN(paused)})
    fitted = fit_step(samples)
    for term in STEP_TERMS:
        assert getattr(fitted, term) == pytest.approx(getattr(KNOWN, term), rel=1e-6,
                                                      abs=1e-12), term


FLAT = StepFit(1.0, 0.0, 0.0, 0.0)


def base_profile(path: Path, step: StepFit = FLAT) -> Path:
    base = ProfiledCost(step, TransferFit(1e-4, 5e-10), kv_bytes_per_token=4096, pages=512,
                        source="base on cpu")
    path.write_text(json.dumps(base.to_json()))
    return path


def test_from_run_scales_the_base_by_what_the_jobs_steps_took(tmp_path):
    slower = StepFit(*(getattr(KNOWN, term) * 1.25 for term in STEP_TERMS))
    out = tmp_path / "in-job.json"
    mpiserve("profile", "--from-run", str(run_dir_with_steps(tmp_path / "a.run", cost=slower)),
             "--base", str(base_profile(tmp_path / "base.json", KNOWN)), "--out", str(out))
    fitted = ProfiledCost.load(out)
    for term in STEP_TERMS:
        assert getattr(fitted.step, term) == pytest.approx(getattr(slower, term), rel=1e-4), term
    assert "the base step model x 1.250, from 60 steps of jobs (a.run)" in fitted.source


def test_from_run_split_finds_the_prefill_terms_and_the_rest_their_own_factors(tmp_path):
    """Jobs whose prefill terms ran 1.3x the base and the rest 0.9x: the split fit finds
    both, where one factor could only average them."""
    jobs = scaled(KNOWN, 0.9, 1.3)
    out = tmp_path / "in-job.json"
    mpiserve("profile", "--from-run", str(run_dir_with_steps(tmp_path / "a.run", cost=jobs)),
             "--fit", "split", "--base", str(base_profile(tmp_path / "base.json", KNOWN)),
             "--out", str(out))
    fitted = ProfiledCost.load(out)
    for term in STEP_TERMS:
        assert getattr(fitted.step, term) == pytest.approx(getattr(jobs, term), rel=1e-4), term
    assert "prefill terms x 1.300, the rest x 0.900" in fitted.source


def test_from_run_refits_every_term_and_keeps_the_rest_of_the_base(tmp_path):
    runs = [run_dir_with_steps(tmp_path / name) for name in ("a.run", "b.run")]
    out = tmp_path / "in-job.json"
    mpiserve("profile", "--from-run", *map(str, runs), "--fit", "terms", "--base",
             str(base_profile(tmp_path / "base.json")), "--out", str(out))
    fitted = ProfiledCost.load(out)
    for term in STEP_TERMS:
        assert getattr(fitted.step, term) == pytest.approx(getattr(KNOWN, term), rel=1e-3,
                                                           abs=1e-11), term
    assert fitted.transfer == TransferFit(1e-4, 5e-10)
    assert (fitted.pages, fitted.kv_bytes_per_token) == (512, 4096)
    assert "every term refitted, from 120 steps of jobs (a.run, b.run)" in fitted.source
    assert len(json.loads(out.read_text())["samples"]) == 120


@pytest.mark.parametrize("case", ["no steps.json", "other TP", "no base"])
def test_from_run_errors_name_what_is_wrong(tmp_path, case):
    run = tmp_path / "job.run"
    base = ["--base", str(base_profile(tmp_path / "base.json"))]
    if case == "no steps.json":
        run.mkdir()
    else:
        run_dir_with_steps(run, tp=2 if case == "other TP" else 1)
    if case == "no base":
        base = []
    done = subprocess.run([sys.executable, "-m", "mpiserve.cli", "profile", "--from-run",
                           str(run), *base, "--out", str(tmp_path / "p.json")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    expected = {"no steps.json": f"{run / STEPS_FILE}: missing",
                "other TP": "engines of tensor-parallel size 2",
                "no base": "--from-run needs --base"}[case]
    assert expected in done.stderr, done.stderr
    assert not (tmp_path / "p.json").exists()


def test_step_timings_keep_every_step_up_to_capacity_then_a_uniform_sample():
    timings = StepTimings(["n"], capacity=100, seed=1)
    for step in range(10_000):
        timings.add([step], 0.001)
    kept = [row[0] for row in timings.rows]
    assert timings.seen == 10_000 and len(kept) == 100 == len(set(kept))
    assert 2_000 < sum(kept) / len(kept) < 8_000            # not only the first steps
    assert sum(k >= 5_000 for k in kept) > 25
    few = StepTimings(["n"], capacity=100)
    for step in range(7):
        few.add([step], 0.5)
    assert samples_of(few.to_json()) == [{"n": step, "seconds": 0.5} for step in range(7)]

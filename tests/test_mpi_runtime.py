"""Real `mpiexec` jobs launched from pytest: every router gives the single-engine greedy output,
KV moves only when it should, and failures end the job cleanly (exit codes, messages, no hang).

Jobs are small (3-4 ranks, a tiny random checkpoint, short prompts) so the file runs in a few
minutes on two cores. Each job has a deadline; a job that outlives it fails its test and is
killed with its whole process tree.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from batch_jobs import MPIEXEC, MPISERVE

from mpiserve import LLM, SamplingParams
from mpiserve.bench.processes import descendants

pytestmark = pytest.mark.mpi

TIMEOUT_S = 180
PAGE = 16
NUM_PAGES = 64
MAX_TOKENS = 12
# token-id prompts: short, exactly one page, one past two pages (so pd's transfer ends on a
# page boundary), and two longer than two pages; plus one string prompt (tokenized on rank 0)
LENGTHS = [5, 16, 33, 47, 70]
TEXT_PROMPT = "The quick brown fox jumps over the lazy dog, then naps in the afternoon sun."

MIGRATE_ROUTER = '''
async def route(request, cluster):
    """Full context migration: one engine computes the whole prompt's KV, another engine
    receives all of it and recomputes only the last position to sample the first token."""
    source = cluster.least_loaded(cluster.prefill)
    target = cluster.least_loaded(cluster.decode)
    cluster.note_strategy(request, "migrate")
    kv = await target.prep_recv(request, end=None)
    if kv.matched < kv.end:
        await source.remote_send(request, kv, begin=kv.matched, end=None)
    async for tokens in target.start_generate(request, begin=len(request.prompt)):
        yield tokens
'''

RAISING_ROUTER = '''
async def route(request, cluster):
    decode = cluster.decode[0]
    if request.id.startswith("boom"):
        await decode.prep_recv(request, end=None)       # pages the router then abandons
        raise ValueError("this router fails on purpose")
    async for tokens in decode.start_generate(request):
        yield tokens
'''

MISUSING_ROUTER = '''
async def route(request, cluster):
    engine = cluster.engines[0]
    kind = request.id.split("-")[0]
    if kind == "string":
        yield "abc"
    elif kind == "outside":
        yield [10**9, -1]
    elif kind == "silent":
        return
    elif kind == "twice":
        for _ in range(2):
            async for tokens in engine.start_generate(request):
                yield tokens
    else:
        async for tokens in engine.start_generate(request):
            yield tokens
'''


# ---- running a job ---------------------------------------------------------------------------
def _kill_tree(proc: subprocess.Popen) -> None:
    tree = descendants(proc.pid)
    proc.send_signal(signal.SIGTERM)          # mpiexec forwards it and cleans up the ranks
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def mpirun(ranks: int, *args, cwd: Path, timeout: float = TIMEOUT_S) -> subprocess.CompletedProcess:
    """`mpiexec -n ranks mpiserve run ARGS`; fails the test if it does not end in time."""
    command = [str(MPIEXEC), "-n", str(ranks), str(MPISERVE), "run", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc)
        out, err = proc.communicate()
        pytest.fail(f"mpiexec -n {ranks} did not finish within {timeout:.0f} s: {command}\n"
                    f"--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}")
    result = subprocess.CompletedProcess(command, proc.returncode, out, err)
    result.seconds = time.monotonic() - started
    return result


def describe(result: subprocess.CompletedProcess) -> str:
    return (f"exit {result.returncode} after {result.seconds:.1f} s: {' '.join(result.args)}\n"
            f"--- stdout\n{result.stdout[-4000:]}\n--- stderr\n{result.stderr[-6000:]}")


def serve(tmp_path: Path, model_dir: Path, lines: list, *options, ranks: int = 3,
          prefill: int = 1, decode: int = 1, router: str = "round_robin",
          expect: int | None = 0) -> tuple[subprocess.CompletedProcess, dict]:
    """Write `lines` (dicts, or raw strings written as they are) as the batch input, run the
    job, check its exit code (unless `expect` is None) and return it with the output records
    by custom_id (records without one under their input line number)."""
    source = tmp_path / "in.jsonl"
    output = tmp_path / "out.jsonl"
    source.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n"
                              for line in lines))
    result = mpirun(ranks, "--model", model_dir, "--prefill", prefill, "--decode", decode,
                    "--router", router, "--input", source, "--output", output,
                    "--page-size", PAGE, "--num-pages", NUM_PAGES, *options, cwd=tmp_path)
    if expect is not None:
        assert result.returncode == expect, describe(result)
    records = read_records(output) if output.exists() else []
    by_id = {}
    for record in records:
        key = record["custom_id"] if record["custom_id"] is not None else record["error"]["line"]
        assert key not in by_id, f"two records for {key!r}:\n{describe(result)}"
        by_id[key] = record
    result.records = records
    return result, by_id


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def completion(custom_id: str, prompt, max_tokens: int = MAX_TOKENS) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions",
            "body": {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                     "ignore_eos": True}}


def body(record: dict) -> dict:
    assert record["error"] is None, record["error"]
    return record["response"]["body"]


def token_ids(record: dict) -> list[int]:
    return body(record)["choices"][0]["token_ids"]


def metrics(record: dict) -> dict:
    return body(record)["metrics"]


# ---- the model, the requests and the single-engine reference ---------------------------------
def random_prompts(lengths, seed: int, vocab: int = 2048) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def greedy(max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tiny_hf_model) -> Path:
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def single_engine(model_dir) -> LLM:
    return LLM(str(model_dir), page_size=PAGE, num_pages=NUM_PAGES)


@pytest.fixture(scope="module")
def kv_bytes_per_token(model_dir) -> int:
    """K and V, every layer, every KV head, float32 (from the checkpoint's config.json)."""
    config = json.loads((model_dir / "config.json").read_text())
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    return 2 * config["num_hidden_layers"] * config["num_key_value_heads"] * head_dim * 4


@pytest.fixture(scope="module")
def batch(single_engine) -> dict:
    """The mixed batch: input lines, prompt token ids and single-engine greedy outputs."""
    prompts = [*random_prompts(LENGTHS, seed=11), TEXT_PROMPT]
    ids = [f"req-{i}" for i in range(len(prompts))]
    outputs = single_engine.generate(prompts, greedy())
    assert all(o.error is None for o in outputs)
    return {"lines": [completion(i, p) for i, p in zip(ids, prompts)],
            "prompt_ids": {i: o.prompt_token_ids for i, o in zip(ids, outputs)},
            "expected": {i: o.token_ids for i, o in zip(ids, outputs)}}


def assert_same_outputs(by_id: dict, expected: dict, result) -> None:
    assert sorted(by_id) == sorted(expected), describe(result)
    got = {i: token_ids(by_id[i]) for i in expected}
    assert got == expected, f"outputs differ from one engine alone:\n{describe(result)}"


# ---- 1, 2, 4: every router gives the single-engine output ------------------------------------
ROUTERS = ["round_robin", "pd", "balanced_pd", "prefix_aware", "adaptive", "user_migrate"]
# every router with two decode engines to choose from; the simplest and the demo's with one
LAYOUTS = [(router, 2) for router in ROUTERS] + [("round_robin", 1), ("balanced_pd", 1)]


@pytest.mark.parametrize("router,decode", LAYOUTS, ids=[f"{r}-{d}decode" for r, d in LAYOUTS])
def test_router_output_matches_single_engine(tmp_path, model_dir, batch, kv_bytes_per_token,
                                             router, decode):
    options = []
    spec = router
    if router == "adaptive":
        options = ["--router-arg", "short_prompt=8"]
    if router == "user_migrate":
        path = tmp_path / "migrate_router.py"
        path.write_text(MIGRATE_ROUTER)
        spec = f"{path}:route"
    result, by_id = serve(tmp_path, model_dir, batch["lines"], *options, ranks=2 + decode,
                          decode=decode, router=spec)
    assert_same_outputs(by_id, batch["expected"], result)
    assert "6 completed, 0 errors" in result.stderr

    m = {i: metrics(by_id[i]) for i in by_id}
    n = {i: len(batch["prompt_ids"][i]) for i in by_id}
    assert all(x["router"] == spec for x in m.values())
    assert all(x["transfer_fallbacks"] == 0 for x in m.values()), m
    engines = set().union(*(x["engines"] for x in m.values()))
    if router == "round_robin":
        assert all(x["kv_bytes"] == 0 and len(x["engines"]) == 1 for x in m.values()), m
        assert engines == set(range(1, 2 + decode)), m        # every engine took a turn
    elif router in ("pd", "balanced_pd"):
        assert all(x["kv_bytes"] > 0 for x in m.values()), m
        assert all(x["strategy"] == router for x in m.values()), m
    elif router == "prefix_aware":
        # nothing cached anywhere: the prefill engine sends all but the last position
        assert all(x["strategy"] == "pd" for x in m.values()), m
        assert all(m[i]["kv_bytes"] == (n[i] - 1) * kv_bytes_per_token for i in m), m
    elif router == "adaptive":
        split = [i for i in m if m[i]["strategy"] == "balanced_pd"]
        assert split, f"short_prompt=8 and no request was split: {m}"
        assert all(m[i]["kv_bytes"] > 0 and n[i] > 8 for i in split), m
        assert all(m[i]["kv_bytes"] == 0 for i in m if i not in split), m
    elif router == "user_migrate":
        # 4: the whole context moves; the receiver recomputes only the last position
        assert all(x["strategy"] == "migrate" for x in m.values()), m
        assert all(m[i]["kv_bytes"] == n[i] * kv_bytes_per_token for i in m), m
        assert all(len(x["engines"]) == 2 for x in m.values()), m
    if router != "round_robin":
        assert 1 in engines, m                           # the prefill engine did work
    if decode == 2 and router != "adaptive":
        # requests arrive together: the load a reservation adds spreads them over both
        assert engines >= {2, 3}, m


# ---- 3: prefix_aware moves only what the receiver lacks ---------------------------------------
def test_prefix_aware_sends_only_what_the_receiver_lacks(tmp_path, model_dir, single_engine,
                                                          kv_bytes_per_token):
    shared = random_prompts([3 * PAGE], seed=21)[0]                  # three full pages
    tail_a, tail_b, tail_c = random_prompts([PAGE + 1, 12, 5], seed=22)
    prompts = {
        "first": shared + tail_a,        # 65 tokens: pd needs [0, 64), four whole pages
        "sibling": shared + tail_b,      # shares three pages with "first"
        "repeat": shared + tail_a,       # identical to "first": the receiver holds [0, 64)
        "cousin": shared + tail_c,       # shares three pages again
        "sibling-again": shared + tail_b,
    }
    expected = {i: o.token_ids for i, o in zip(prompts, single_engine.generate(
        list(prompts.values()), greedy()))}
    lines = [completion(i, p) for i, p in prompts.items()]
    result, by_id = serve(tmp_path, model_dir, lines, "--max-inflight", 1,
                          router="prefix_aware")
    assert_same_outputs(by_id, expected, result)
    m = {i: metrics(by_id[i]) for i in prompts}

    def sent_tokens(i):
        return m[i]["kv_bytes"] / kv_bytes_per_token

    assert m["first"]["prefix_matched"] == 0 and sent_tokens("first") == 64, m
    for i in ("sibling", "repeat", "cousin", "sibling-again"):
        assert m[i]["prefix_matched"] >= 3 * PAGE, m
        assert m[i]["kv_bytes"] == \
            (len(prompts[i]) - 1 - m[i]["prefix_matched"]) * kv_bytes_per_token, m
    assert m["sibling"]["prefix_matched"] == 3 * PAGE and sent_tokens("sibling") == 12 - 1, m
    assert m["cousin"]["prefix_matched"] == 3 * PAGE and sent_tokens("cousin") == 5 - 1, m
    # an identical prompt: the receiver already holds everything pd would send
    assert m["repeat"]["prefix_matched"] == 64 and m["repeat"]["kv_bytes"] == 0, m
    assert m["repeat"]["strategy"] == "prefix_hit" and m["repeat"]["engines"] == [2], m


# ---- KV streamed in pieces while the sender's prefill proceeds chunk by chunk -----------------
def test_chunked_prefill_streams_kv_in_pieces(tmp_path, model_dir, batch, kv_bytes_per_token):
    """A 16-token step budget splits every prompt's prefill, so each transfer comes in several
    pieces and one step carries pieces of several requests to the same receiver."""
    result, by_id = serve(tmp_path, model_dir, batch["lines"], "--max-batch-tokens", 16,
                          router="pd")
    assert_same_outputs(by_id, batch["expected"], result)
    for custom_id, record in by_id.items():
        sent = len(batch["prompt_ids"][custom_id]) - 1
        assert metrics(record)["kv_bytes"] == sent * kv_bytes_per_token, metrics(record)


# ---- 5: a failed transfer falls back to recomputing -------------------------------------------
def test_failed_transfers_fall_back_to_recompute(tmp_path, model_dir, batch):
    result, by_id = serve(tmp_path, model_dir, batch["lines"], "--fail-transfers", 100,
                          router="pd")
    assert_same_outputs(by_id, batch["expected"], result)
    for record in by_id.values():
        m = metrics(record)
        assert m["transfer_fallbacks"] >= 1 and m["kv_bytes"] == 0, m


# ---- 6: usage errors and request errors -------------------------------------------------------
def test_world_size_mismatch_exits_2_with_one_message(tmp_path, model_dir, batch):
    result, _ = serve(tmp_path, model_dir, batch["lines"], ranks=3, prefill=2, decode=2,
                      expect=2)
    said = result.stdout + result.stderr
    assert said.count("world size 3") == 1, describe(result)
    assert "mpiexec -n 5" in said, describe(result)
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_router_file_exits_2_naming_it(tmp_path, model_dir, batch):
    missing = tmp_path / "missing.py"
    result, _ = serve(tmp_path, model_dir, batch["lines"], router=f"{missing}:route", expect=2)
    said = result.stdout + result.stderr
    assert said.count(f"no such file {missing}") == 1, describe(result)


def test_router_that_raises_fails_only_its_request(tmp_path, model_dir, batch):
    """Each "boom" request reserves 3 of the decode engine's 8 pages, then its router raises:
    the runtime gives those pages back, or the third one would wait for pages forever."""
    path = tmp_path / "raising_router.py"
    path.write_text(RAISING_ROUTER)
    booms = [completion(f"boom-{i}", p) for i, p in enumerate(random_prompts([40] * 4, seed=5))]
    lines = [batch["lines"][0], *booms[:2], batch["lines"][1], *booms[2:], batch["lines"][2]]
    result, by_id = serve(tmp_path, model_dir, lines, "--max-inflight", 1, "--num-pages", 8,
                          router=f"{path}:route")
    ok = ["req-0", "req-1", "req-2"]
    assert len(result.records) == 7, describe(result)
    assert sorted(by_id) == sorted(ok + [b["custom_id"] for b in booms]), describe(result)
    for boom in booms:
        record = by_id[boom["custom_id"]]
        error = record["error"]
        assert error["code"] == "router_error" and record["response"]["status_code"] == 500
        assert "Traceback (most recent call last)" in error["message"], error
        assert "ValueError: this router fails on purpose" in error["message"], error
        assert "raising_router.py" in error["message"], error
    assert by_id["boom-0"]["error"]["line"] == 2
    for i in ok:
        assert token_ids(by_id[i]) == batch["expected"][i]
    assert "3 completed, 4 errors" in result.stderr


def one_request_usage_error(tmp_path: Path, batch, model, output: str = "out.jsonl"):
    """Run one request on 3 ranks expecting a usage error: exit 2 and exactly one error line.
    Returns that line and the job's result."""
    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps(batch["lines"][0]) + "\n")
    result = mpirun(3, "--model", model, "--prefill", 1, "--decode", 1, "--input", source,
                    "--output", tmp_path / output, cwd=tmp_path, timeout=60)
    assert result.returncode == 2, describe(result)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, describe(result)
    return errors[0], result


@pytest.mark.parametrize("where", ["missing-dir/out.jsonl", "a-directory"])
def test_unusable_output_exits_2_before_loading(tmp_path, model_dir, batch, where):
    (tmp_path / "a-directory").mkdir()
    error, result = one_request_usage_error(tmp_path, batch, model_dir, output=where)
    assert where.split("/")[0] in error, describe(result)


@pytest.mark.parametrize("damage", ["truncated", "incomplete"])
def test_damaged_checkpoint_exits_2_naming_the_file(tmp_path, model_dir, batch, damage):
    """A cut-off download or a missing tensor is a model problem: exit 2, one line naming the
    file, found by rank 0 before the engines load."""
    damaged = tmp_path / "model"
    damaged.mkdir()
    for path in Path(model_dir).iterdir():
        (damaged / path.name).write_bytes(path.read_bytes())
    weights = damaged / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-16])
    else:
        config = json.loads((damaged / "config.json").read_text())
        (damaged / "config.json").write_text(json.dumps(
            dict(config, num_hidden_layers=config["num_hidden_layers"] + 1)))
    error, result = one_request_usage_error(tmp_path, batch, damaged)
    assert "model" in error, describe(result)
    assert ("model.safetensors" if damage == "truncated" else "missing") in error
    assert "Traceback" not in result.stderr, describe(result)
    assert not (tmp_path / "out.jsonl.lock").exists()


def test_truncated_gguf_exits_2_naming_the_file(tmp_path, model_dir, batch):
    """A cut-off .gguf download: rank 0 reads the file's metadata and tensor table before the
    engines load, so it is the same one-line exit 2 as a damaged safetensors file."""
    from test_gguf_checkpoint import gguf, write_gguf

    from mpiserve.model.checkpoint import load_checkpoint
    config, weights = load_checkpoint(model_dir)
    path = tmp_path / "cut.gguf"
    write_gguf(path, config, weights, gguf.GGMLQuantizationType.F32)
    path.write_bytes(path.read_bytes()[:-64])
    error, result = one_request_usage_error(tmp_path, batch, path)
    assert "cut.gguf: not a readable GGUF file" in error, describe(result)
    assert "Traceback" not in result.stderr, describe(result)


def test_repeated_id_and_late_bom_keep_their_ids_and_resume_keeps_them(tmp_path, model_dir,
                                                                      batch):
    """Their error records carry the custom_id that was read; a clean exit removes the lock
    file; a re-run finds every line answered and writes nothing."""
    first = batch["lines"][0]
    lines = [json.dumps(first), json.dumps(first), "\ufeff" + json.dumps(batch["lines"][1])]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")
    result = mpirun(3, "--model", model_dir, "--prefill", 1, "--decode", 1, "--input",
                    tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", cwd=tmp_path)
    assert result.returncode == 0, describe(result)
    records = read_records(tmp_path / "out.jsonl")
    assert len(records) == 3, describe(result)
    errors = {r["error"]["line"]: r for r in records if r["error"] is not None}
    assert sorted(errors) == [2, 3], records
    assert errors[2]["custom_id"] == first["custom_id"]
    assert errors[2]["error"]["code"] == "duplicate_custom_id"
    assert errors[3]["custom_id"] == batch["lines"][1]["custom_id"]
    assert "byte order mark" in errors[3]["error"]["message"]
    assert not (tmp_path / "out.jsonl.lock").exists()
    again = mpirun(3, "--model", model_dir, "--prefill", 1, "--decode", 1, "--input",
                   tmp_path / "in.jsonl", "--output", tmp_path / "out.jsonl", cwd=tmp_path)
    assert again.returncode == 0 and "3 already in" in again.stderr, describe(again)
    assert len(read_records(tmp_path / "out.jsonl")) == 3


def test_router_breaking_the_contract_gets_one_error_record_each(tmp_path, model_dir, batch):
    """Yielding a string or ids outside the vocabulary, returning without generating, and
    generating twice each give the request a router_error naming the rule; nothing is lost."""
    path = tmp_path / "misusing_router.py"
    path.write_text(MISUSING_ROUTER)
    prompts = random_prompts([9] * 4, seed=21)
    bad = {"string-0": "yields lists of token ids", "outside-0": "yields lists of token ids",
           "silent-0": "returned before a start_generate stream finished",
           "twice-0": "start_generate called again"}
    lines = [batch["lines"][0], *(completion(i, p) for i, p in zip(bad, prompts))]
    result, by_id = serve(tmp_path, model_dir, lines, router=f"{path}:route")
    assert len(result.records) == len(lines), describe(result)
    assert token_ids(by_id["req-0"]) == batch["expected"]["req-0"]
    for custom_id, rule in bad.items():
        error = by_id[custom_id]["error"]
        assert error is not None and error["code"] == "router_error", by_id[custom_id]
        assert rule in error["message"] and "misusing_router.py" in error["message"], error
    assert "1 completed, 4 errors" in result.stderr, describe(result)
    assert "never retrieved" not in result.stderr, describe(result)


def test_malformed_line_gets_an_error_record_naming_it(tmp_path, model_dir, batch):
    lines = [batch["lines"][0], '{"custom_id": "torn", "method": "POST",', batch["lines"][1],
             "", batch["lines"][5]]
    result, by_id = serve(tmp_path, model_dir, lines, router="round_robin")
    # one record per non-blank input line; the torn line has no usable custom_id
    assert len(result.records) == 4, describe(result)
    assert sorted(by_id, key=str) == [2, "req-0", "req-1", "req-5"], by_id.keys()
    error = by_id[2]["error"]
    assert error["line"] == 2 and "line 2" in error["message"], error
    assert "invalid JSON" in error["message"], error
    for i in ("req-0", "req-1", "req-5"):
        assert token_ids(by_id[i]) == batch["expected"][i]
    assert "3 completed, 1 errors" in result.stderr


# ---- 7: an engine that cannot start ends the job ----------------------------------------------
def test_engine_crash_is_reported_and_ends_the_job(tmp_path, model_dir, batch):
    """Rank 0 checks the checkpoint, so make the engines fail on their own: a device that
    this CPU build of torch cannot use."""
    result, _ = serve(tmp_path, model_dir, batch["lines"], "--device", "cuda", expect=None)
    assert result.returncode != 0, describe(result)
    assert "job failed: engine rank" in result.stderr, describe(result)
    assert "CUDA" in result.stderr, describe(result)
    assert result.seconds < 60, describe(result)


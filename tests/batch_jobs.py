"""Helpers for tests that start whole `mpiserve run` jobs and interrupt them: a request file,
a job started in the background with a deadline, waiting for output lines, killing a job's
whole process tree, reading the output, and an uninterrupted reference run (made once per test
session per input) to compare token ids against."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mpiserve.bench.processes import descendants

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
MPIEXEC = BIN / "mpiexec"
MPISERVE = BIN / "mpiserve"
JOB_TIMEOUT_S = 240
# one input shared by the signal and Slurm tests: long enough (one request at a time) that a
# stop lands mid-run, short enough to run in seconds on the demo model
NUM_REQUESTS = 40
MAX_TOKENS = 40
JOB_OPTIONS = ("--prefill", "1", "--decode", "1", "--router", "balanced_pd",
               "--max-inflight", "1")


def write_requests(path: Path, count: int = NUM_REQUESTS, max_tokens: int = MAX_TOKENS) -> Path:
    """`count` greedy completions with distinct prompts, ids "q0".."q{count-1}"."""
    topics = ["rivers", "bread", "printing presses", "glaciers", "lighthouses", "bees",
              "trains", "libraries"]
    with open(path, "w") as out:
        for i in range(count):
            prompt = f"Write a paragraph about {topics[i % len(topics)]}, part {i}."
            out.write(json.dumps({"custom_id": f"q{i}", "method": "POST",
                                  "url": "/v1/completions",
                                  "body": {"prompt": prompt, "max_tokens": max_tokens,
                                           "temperature": 0}}) + "\n")
    return path


def input_ids(path: Path) -> list[str]:
    return [json.loads(line)["custom_id"] for line in path.read_text().splitlines()
            if line.strip()]


def job_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", **extra}


def start_job(source: Path, output: Path, *options, ranks: int = 3, command=None,
              log: Path | None = None, cwd: Path | None = None) -> subprocess.Popen:
    """`mpiexec -n ranks mpiserve run ...` in its own session (so a process-group signal
    reaches mpiexec and nothing else), stdout+stderr to `log`."""
    command = command or [str(MPIEXEC), "-n", str(ranks), str(MPISERVE), "run"]
    args = [*command, "--input", str(source), "--output", str(output), *JOB_OPTIONS,
            *map(str, options)]
    log = log or output.with_suffix(".log")
    with open(log, "ab") as sink:
        proc = subprocess.Popen(args, stdout=sink, stderr=subprocess.STDOUT, env=job_env(),
                                cwd=cwd or output.parent, start_new_session=True,
                                preexec_fn=_default_stop_signals)
    proc.log_path = log
    proc.started = time.monotonic()
    return proc


def _default_stop_signals() -> None:
    """A test run started from a background shell inherits SIGINT ignored, and a shell cannot
    trap a signal ignored on entry: give the job the default dispositions a terminal gives."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


PROGRESS_LINE = re.compile(r"^\[\d+:\d\d:\d\d\] ")      # the dashboard's periodic lines


def log_text(proc_or_path, tail: int = 8000) -> str:
    """The job's log without the dashboard's progress lines, its last `tail` characters."""
    path = getattr(proc_or_path, "log_path", proc_or_path)
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(line for line in text.splitlines()
                     if not PROGRESS_LINE.match(line))[-tail:]


def finish(proc: subprocess.Popen, timeout: float = JOB_TIMEOUT_S) -> int:
    """Wait for the job; on timeout kill its tree and fail the test with its log."""
    try:
        return proc.wait(timeout=max(1.0, timeout - (time.monotonic() - proc.started)))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail(f"job did not finish within {timeout:.0f} s: {proc.args}\n"
                    f"{log_text(proc)}")


def run_job(source: Path, output: Path, *options, **kwargs) -> tuple[int, str]:
    proc = start_job(source, output, *options, **kwargs)
    code = finish(proc)
    return code, log_text(proc)


def count_lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def wait_for_lines(path: Path, lines: int, proc: subprocess.Popen | None = None,
                   timeout: float = JOB_TIMEOUT_S) -> None:
    """Until `path` has `lines` complete lines; fails if the job ends first or time runs out
    (killing the job)."""
    deadline = time.monotonic() + timeout
    while count_lines(path) < lines:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"job exited {proc.returncode} before {path.name} had {lines} lines\n"
                        f"{log_text(proc)}")
        if time.monotonic() > deadline:
            if proc is not None:
                kill_tree(proc)
            pytest.fail(f"{path.name} had {count_lines(path)} lines after {timeout:.0f} s, "
                        f"waiting for {lines}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """Running (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def wait_gone(pids, timeout: float) -> list[int]:
    """Wait until none of `pids` runs; returns those still running after `timeout`."""
    deadline = time.monotonic() + timeout
    left = [pid for pid in pids if alive(pid)]
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = [pid for pid in left if alive(pid)]
    return left


def catches_signal(pid: int, signum: int, keys=("SigCgt",)) -> bool:
    """Whether process `pid` has a handler for `signum` (with keys=("SigCgt", "SigIgn"): or
    ignores it)."""
    masks = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            masks[key] = value.strip()
    except OSError:
        return False
    bit = 1 << (signum - 1)
    return any(int(masks.get(key, "0"), 16) & bit for key in keys)


def rank_pids(proc: subprocess.Popen) -> list[int]:
    """The job's rank processes (descendants of mpiexec running `mpiserve run`)."""
    return mpiserve_ranks(descendants(proc.pid))


def mpiserve_ranks(pids) -> list[int]:
    """Those of `pids` that run `mpiserve run`."""
    ranks = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(arg.endswith(b"mpiserve") for arg in argv[:2]) and b"run" in argv:
            ranks.append(pid)
    return ranks


def kill_tree(proc: subprocess.Popen) -> None:
    tree = descendants(proc.pid)
    for pid in [proc.pid, *tree]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


def read_records(path: Path) -> list[dict]:
    """Every line of the output as a record; fails on a torn or unparsable line."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), f"{path.name} ends in a torn line: {data[-200:]!r}"
    records = []
    for number, line in enumerate(data.splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"{path.name} line {number} does not parse: {line[:200]!r}")
    return records


def tokens_by_id(records: list[dict]) -> dict[str, list[int]]:
    """custom_id -> token_ids; fails on a duplicate custom_id or an error record."""
    tokens: dict[str, list[int]] = {}
    for record in records:
        key = record["custom_id"]
        assert key not in tokens, f"two records for {key!r}"
        assert record["error"] is None, f"{key}: {record['error']}"
        tokens[key] = record["response"]["body"]["choices"][0]["token_ids"]
    return tokens


_REFERENCE: dict[str, dict[str, list[int]]] = {}


def reference_tokens(source: Path, workdir: Path) -> dict[str, list[int]]:
    """Token ids per custom_id of one uninterrupted run of `source` (cached by content)."""
    key = source.read_text()
    if key not in _REFERENCE:
        output = workdir / "reference-out.jsonl"
        code, log = run_job(source, output)
        assert code == 0, f"the uninterrupted reference run exited {code}\n{log}"
        tokens = tokens_by_id(read_records(output))
        assert sorted(tokens) == sorted(input_ids(source)), log
        _REFERENCE[key] = tokens
    return _REFERENCE[key]

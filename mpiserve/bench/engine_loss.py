"""Engine loss: how long a job takes to end after an engine rank stops answering.

    python -m mpiserve.bench.engine_loss [--heartbeat-timeout 5] [--decode-tp 1] [--quick]
                                         [--out results]

Starts `mpiexec -n 3 mpiserve run` (1 prefill + 1 decode engine) on requests that arrive one
every half second, waits for the first records, then freezes the decode engine's last rank
with SIGSTOP (a hung node: its process stays, it answers nothing); with `--decode-tp 2` that
rank is a tensor-parallel follower, which leaves its lead stuck in a collective. Rank 0's
heartbeat check must end the job with exit 1 within the heartbeat timeout + 5 s, naming the
lost rank and where it is; records
already written stay whole (one per id). Writes `engine_loss.json` (with --decode-tp 2:
`engine_loss_tp_follower.json`) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .idle import find_ranks
from .processes import kill_tree
from .report_files import write_report

BOUND_EXTRA_S = 5.0


def write_requests(path: Path, count: int, every_s: float) -> None:
    with open(path, "w") as out:
        for i in range(count):
            out.write(json.dumps({
                "custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                "arrival_s": i * every_s,
                "body": {"prompt": [5 + i % 50, 6, 7, 8, 9], "max_tokens": 8,
                         "temperature": 0}}) + "\n")


def output_ids(path: Path) -> list[str]:
    """custom_ids of the complete lines written (each line must parse)."""
    if not path.exists():
        return []
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line)["custom_id"] for line in lines if line.strip()]


def wait_for_records(output: Path, count: int, proc: subprocess.Popen, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while len(output_ids(output)) < count:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the job wrote {len(output_ids(output))} records before the "
                               f"engine was to be stopped (exit {proc.poll()})")
        time.sleep(0.1)


def measure(model: str, work: Path, heartbeat_timeout_s: float, decode_tp: int = 1,
            load_timeout_s: float = 180.0) -> dict:
    """Run the job, stop the decode engine's last rank, time the job's end. The job log is
    `work/job.log`."""
    from .serving import find_mpiexec, mpiserve_command
    source, output = work / "in.jsonl", work / "out.jsonl"
    write_requests(source, count=400, every_s=0.5)
    world = 2 + decode_tp
    stopped_rank = world - 1
    command = [find_mpiexec(), "-n", str(world), *mpiserve_command(), "run", "--prefill", "1",
               "--decode", "1", "--decode-tp", str(decode_tp), "--router", "round_robin",
               "--model", model,
               "--heartbeat-timeout", str(heartbeat_timeout_s), "--input", str(source),
               "--output", str(output), "--dashboard", "off"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(work / "job.log", "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        ranks = find_ranks(proc.pid, world, load_timeout_s)
        wait_for_records(output, 2, proc, load_timeout_s)
        os.kill(ranks[stopped_rank], signal.SIGSTOP)
        stopped = time.monotonic()
        try:
            proc.wait(timeout=heartbeat_timeout_s + 60.0)
        except subprocess.TimeoutExpired:
            pass
        ended_s = time.monotonic() - stopped if proc.returncode is not None else None
    finally:
        kill_tree(proc, grace_s=5.0)
    ids = output_ids(output)
    lost = [line for line in (work / "job.log").read_text(errors="replace").splitlines()
            if "lost engine rank" in line]
    return {"heartbeat_timeout_s": heartbeat_timeout_s, "decode_tp": decode_tp,
            "stopped_rank": stopped_rank,
            "exit_code": proc.returncode, "seconds_to_exit": ended_s,
            "bound_s": heartbeat_timeout_s + BOUND_EXTRA_S,
            "within_bound": ended_s is not None and ended_s <= heartbeat_timeout_s
            + BOUND_EXTRA_S, "message": lost[0] if lost else None,
            "records": len(ids), "distinct_ids": len(set(ids))}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mpiserve.bench.engine_loss",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--heartbeat-timeout", type=float, default=5.0)
    parser.add_argument("--decode-tp", type=int, default=1,
                        help="ranks of the decode engine (2: the stopped rank is a follower)")
    parser.add_argument("--model", help="checkpoint directory (default: the benchmark model)")
    parser.add_argument("--out", default="results", help="output directory (default results)")
    parser.add_argument("--quick", action="store_true", help="tiny model")
    args = parser.parse_args(argv)
    from .bench_model import BENCH, QUICK, bench_model_dir
    model = args.model or str(bench_model_dir(QUICK if args.quick else BENCH))
    with tempfile.TemporaryDirectory(prefix="mpiserve-engine-loss-") as work:
        result = measure(model, Path(work), args.heartbeat_timeout, args.decode_tp)
        log_tail = (Path(work) / "job.log").read_text(errors="replace")[-3000:]
    result["command"] = "python -m mpiserve.bench.engine_loss " + " ".join(argv)
    name = "engine_loss" if args.decode_tp == 1 else "engine_loss_tp_follower"
    write_report(args.out, name, result)
    print(f"engine rank {result['stopped_rank']} stopped: job exited {result['exit_code']} after "
          f"{result['seconds_to_exit']} s (bound {result['bound_s']:g} s)")
    print(f"message: {result['message']}")
    if not result["within_bound"] or result["exit_code"] != 1:
        print(log_tail, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

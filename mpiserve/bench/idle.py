"""Idle cost: the CPU a job's ranks burn while the router has nothing to do.

    python -m mpiserve.bench.idle [--window 30] [--quick] [--out results]

Starts `mpiexec -n 3 mpiserve run` (1 prefill + 1 decode engine) on an input whose only request
arrives long after the measurement (its `arrival_s` lies past the window), waits until the
engines have loaded (every rank's CPU use has settled), then reads each rank's CPU time (user +
system, all threads) from /proc/<pid>/stat at the start and the end of the idle window. Ends the
job with SIGTERM (it stops admission and exits 3, as a Slurm preemption would). Target: under 5%
of one core per rank. Writes `idle.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .processes import command_line, cpu_seconds, descendants, kill_tree, mpi_rank
from .report_files import write_report

TARGET_SHARE = 0.05
SETTLED_SHARE = 0.2            # a rank using less than this of a core has finished loading


def find_ranks(launcher: int, count: int, timeout_s: float) -> dict[int, int]:
    """{MPI rank: pid} of the job's rank processes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ranks = {}
        for pid in descendants(launcher):
            rank = mpi_rank(pid)
            if rank is not None and "run" in command_line(pid):
                ranks[rank] = pid
        if len(ranks) == count:
            return ranks
        time.sleep(0.2)
    raise SystemExit(f"the job's {count} rank processes did not appear within {timeout_s:.0f} s")


def cpu_shares(pids: dict[int, int], seconds: float) -> dict[int, float]:
    """Share of one core each process used over the next `seconds`."""
    before = {r: cpu_seconds(p) for r, p in pids.items()}
    started = time.monotonic()
    time.sleep(seconds)
    after = {r: cpu_seconds(p) for r, p in pids.items()}
    elapsed = time.monotonic() - started
    if any(v is None for v in (*before.values(), *after.values())):
        raise SystemExit("a rank process ended during the measurement")
    return {r: (after[r] - before[r]) / elapsed for r in pids}


def wait_settled(pids: dict[int, int], timeout_s: float) -> float:
    """Wait until every rank used under SETTLED_SHARE of a core for two seconds in a row."""
    started = time.monotonic()
    calm = 0
    while time.monotonic() - started < timeout_s:
        shares = cpu_shares(pids, 1.0)
        calm = calm + 1 if max(shares.values()) < SETTLED_SHARE else 0
        if calm >= 2:
            return time.monotonic() - started
    raise SystemExit(f"the ranks were still busy after {timeout_s:.0f} s (loading the model?)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m mpiserve.bench.idle",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, help="idle seconds measured (default 30; "
                        "quick: 3)")
    parser.add_argument("--model", help="checkpoint directory (default: the benchmark model)")
    parser.add_argument("--load-timeout", type=float, default=180.0,
                        help="seconds allowed for the engines to load")
    parser.add_argument("--out", default="results", help="output directory (default results)")
    parser.add_argument("--quick", action="store_true", help="tiny model, 3 s window")
    args = parser.parse_args(argv)
    from .bench_model import BENCH, QUICK, bench_model_dir
    from .serving import find_mpiexec, mpiserve_command
    window = args.window or (3.0 if args.quick else 30.0)
    shape = QUICK if args.quick else BENCH
    model = args.model or str(bench_model_dir(shape))
    arrival = args.load_timeout + window + 30.0
    with tempfile.TemporaryDirectory(prefix="mpiserve-idle-") as work:
        work = Path(work)
        source, output = work / "in.jsonl", work / "out.jsonl"
        source.write_text(json.dumps({
            "custom_id": "late", "method": "POST", "url": "/v1/completions",
            "arrival_s": arrival,
            "body": {"prompt": [5, 6, 7, 8], "max_tokens": 2, "temperature": 0}}) + "\n")
        command = [find_mpiexec(), "-n", "3", *mpiserve_command(), "run", "--prefill", "1",
                   "--decode", "1", "--router", "round_robin", "--model", model,
                   "--input", str(source), "--output", str(output), "--dashboard", "off"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with open(work / "job.log", "w") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            try:
                ranks = find_ranks(proc.pid, 3, args.load_timeout)
                loaded_s = wait_settled(ranks, args.load_timeout)
                launcher = {"mpiexec": proc.pid}
                for i, pid in enumerate(p for p in descendants(proc.pid)
                                        if p not in ranks.values()):
                    name = Path((command_line(pid) or ["process"])[0]).name
                    launcher[f"{name}" if name not in launcher else f"{name} {i}"] = pid
                shares = cpu_shares({**ranks, **launcher}, window)
                written = output.exists() and output.read_text().strip()
            finally:
                kill_tree(proc, grace_s=30.0)
        exit_code = proc.returncode
        job_log = (work / "job.log").read_text()
    rank_shares = {str(r): shares[r] for r in sorted(ranks)}
    result = {
        "command": "python -m mpiserve.bench.idle" + (" " + shlex.join(argv) if argv else ""),
        "quick": bool(args.quick), "window_s": window, "load_s": loaded_s,
        "model": Path(args.model).name if args.model else shape.describe(),
        "job": "mpiexec -n 3 mpiserve run --prefill 1 --decode 1 --router round_robin "
               f"(one request at arrival_s={arrival:g}, after the window)",
        "cpu_share_per_rank": rank_shares,
        "launcher_cpu_share": {k: shares[k] for k in launcher},
        "max_rank_share": max(rank_shares.values()), "target_share": TARGET_SHARE,
        "meets_target": max(rank_shares.values()) < TARGET_SHARE,
        "request_served_during_window": bool(written), "job_exit_code": exit_code}
    write_report(args.out, "idle", result)
    for rank, share in rank_shares.items():
        print(f"rank {rank}: {share:.2%} of a core over {window:g} s idle")
    print(f"target < {TARGET_SHARE:.0%} per rank: {'met' if result['meets_target'] else 'NOT met'}")
    if written or exit_code not in (0, 3):
        print(f"the job did not stay idle or did not stop cleanly (exit {exit_code}):\n"
              f"{job_log[-3000:]}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

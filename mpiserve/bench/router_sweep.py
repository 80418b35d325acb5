"""Routers compared in the simulator over workloads, rates and seeds (issue 11, item 6): the
mean JCT of each router, averaged over the seeds, and each candidate's ratio to the best fixed
router at the same point.

    python -m mpiserve.bench.router_sweep --profile PROFILE.json [--seeds 3] [--requests 48]
        [--candidates adaptive,FILE.py:function] [--out results]

Each point is one `mpiserve simulate` run per seed (1 prefill + 1 decode engine, the profile's
step and KV-copy times). Writes `router_sweep.json` and `.md` to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import statistics
import sys
import tempfile
from pathlib import Path

from ..cli import main as mpiserve_main
from .report_files import write_report

FIXED = ("round_robin", "pd", "balanced_pd:auto", "balanced_pd:0.1", "prefix_aware")
POINTS = {"long": (0.2, 0.3, 0.4), "chat": (1, 2, 3), "shared_prefix": (2,)}


def simulated_jcts(workload: str, rates, routers: list[str], seed: int, requests: int,
                   profile: str, work: Path) -> dict[tuple, float]:
    """(rate, router) -> mean JCT of one seed (inf when a request did not complete)."""
    out = work / f"{workload}-{seed}"
    words = ["simulate", "--workload", workload, "--routers", ",".join(routers),
             "--rates", ",".join(map(str, rates)), "--requests", str(requests),
             "--seed", str(seed), "--profile", profile, "--out", str(out)]
    with contextlib.redirect_stderr(io.StringIO()) as said:
        code = mpiserve_main(words)
    if code != 0:
        raise SystemExit(f"router_sweep: mpiserve {shlex.join(words)} exited {code}:\n"
                         f"{said.getvalue()[-2000:]}")
    rows = json.loads((out / "strategies.json").read_text())
    return {(r["rate"], r["router"]): r["mean_jct"] if r["completed"] == requests
            else float("inf") for r in rows if r.get("simulated")}


def sweep(args, work: Path) -> list[dict]:
    candidates = args.candidates.split(",")
    points = []
    for workload, rates in POINTS.items():
        per_seed = [simulated_jcts(workload, rates, [*FIXED, *candidates], seed, args.requests,
                                   args.profile, work) for seed in range(1, args.seeds + 1)]
        for rate in rates:
            mean = {router: statistics.mean(jcts[(rate, router)] for jcts in per_seed)
                    for router in [*FIXED, *candidates]}
            best = min(FIXED, key=mean.get)
            points.append({"workload": workload, "rate": rate, "mean_jct": mean,
                           "best_fixed": best,
                           "ratio_to_best_fixed": {c: mean[c] / mean[best] for c in candidates}})
    return points


def markdown(report: dict) -> str:
    candidates = report["candidates"]
    lines = ["# Routers in the simulator: each candidate against the best fixed router", "",
             f"Command: `{report['command']}`", "",
             f"Mean JCT (s) over {report['seeds']} seeds of {report['requests']} requests per "
             "point, 1 prefill + 1 decode engine, profile: "
             f"{report['profile_source']}.", "",
             "| workload | rate | " + " | ".join(FIXED) + " | best fixed | "
             + " | ".join(f"{c} / best" for c in candidates) + " |",
             "|---|---:|" + "---:|" * len(FIXED) + "---|" + "---:|" * len(candidates)]
    for p in report["points"]:
        lines.append(f"| {p['workload']} | {p['rate']:g} | "
                     + " | ".join(f"{p['mean_jct'][r]:.2f}" for r in FIXED)
                     + f" | {p['best_fixed']} | "
                     + " | ".join(f"{p['ratio_to_best_fixed'][c]:.3f}" for c in candidates)
                     + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", required=True, help="a profile from `mpiserve profile`")
    parser.add_argument("--candidates", default="adaptive",
                        help="comma list of routers to compare with the fixed ones")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=48, help="requests per run")
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mpiserve-sweep-") as work:
        points = sweep(args, Path(work))
    profile = json.loads(Path(args.profile).read_text())
    report = {"command": "python -m mpiserve.bench.router_sweep " + shlex.join(argv),
              "candidates": args.candidates.split(","), "seeds": args.seeds,
              "requests": args.requests, "profile_source": profile.get("source"),
              "points": points}
    write_report(args.out, "router_sweep", report, markdown(report))
    for p in points:
        ratios = ", ".join(f"{c} {r:.3f}" for c, r in p["ratio_to_best_fixed"].items())
        print(f"{p['workload']} {p['rate']:g}: best fixed {p['best_fixed']} "
              f"{p['mean_jct'][p['best_fixed']]:.2f} s; {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`mpiserve plan`: the best engine layout for a number of devices, found by simulation.

    mpiserve plan --devices 8 --tp-options 1,2,4,8 --workload chat --routers round_robin,pd \\
        --rates 2,4 --hardware h100 --model-config llama-8b/config.json --out results

Every layout of P prefill and D decode engines of TP t with (P + D) * t == devices, D >= 1, is
simulated for each router and rate, with the cost model and engine options of `mpiserve
simulate`. For each router and rate it prints the layout with the lowest mean JCT among those
that completed every request, and writes every layout's figures to `plan.json`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..bench.metrics import summarize
from ..bench.report_files import write_report
from ..bench.serving import parse_routers
from ..errors import MpiserveError
from .cost_choice import sim_setup
from .fresh_router import fresh_router
from .simulate_command import add_arguments as simulate_arguments
from .simulate_command import workload_runs
from .simulation import SimLayout, simulate

# They disaggregate onto prefill engines; with none they would only split work between
# decode engines, which is not the layout they are meant for.
NEEDS_PREFILL = ("pd", "balanced_pd")
FIGURES = ("mean_jct", "p99_jct", "mean_ttft", "mean_tpot")


def say(message: str) -> None:
    print(f"mpiserve plan: {message}", file=sys.stderr, flush=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, required=True,
                        help="devices to lay out: (prefill + decode engines) x TP")
    parser.add_argument("--tp-options", default="1,2,4,8",
                        help="TP sizes to try, comma list (default %(default)s)")
    simulate_arguments(parser, layout=False)


def layouts(devices: int, tp: int) -> list[SimLayout]:
    """P prefill and D decode engines of TP `tp` on exactly `devices` devices, D >= 1."""
    if devices % tp:
        return []
    engines = devices // tp
    return [SimLayout(prefill, engines - prefill, tp) for prefill in range(engines)]


def run_plan(args, argv: list[str] | None = None) -> int:
    try:
        tp_options = _tp_options(args.tp_options, args.devices)
        routers = parse_routers(args.routers)
        setups, skipped = _setups(args, tp_options)
        runs = workload_runs(args, next(iter(setups.values())))
    except (ValueError, MpiserveError) as exc:
        say(f"error: {exc}")
        return 2
    rows = []
    for run in routers:
        if run.router in NEEDS_PREFILL:
            skipped.append(f"{run.label}: layouts with no prefill engine (it needs one)")
        for tp, setup in setups.items():
            for layout in layouts(args.devices, tp):
                if layout.prefill == 0 and run.router in NEEDS_PREFILL:
                    continue
                for name, rate, requests, _ in runs:
                    rows.append(_row(run, layout, setup, name, rate, requests))
    best = best_layouts(rows)
    for line in skipped:
        say(f"skipped {line}")
    print(_table(best, args.devices))
    command = "mpiserve plan" + ("" if not argv else " " + shlex.join(argv))
    path = write_report(args.out, "plan", {
        "command": command, "devices": args.devices, "tp_options": tp_options,
        "workload": runs[0][0], "cost_model": next(iter(setups.values())).cost.describe(),
        "best": best, "skipped": skipped, "layouts": rows})
    say(f"wrote {path}")
    wanted = {(r["router"], r["rate"]) for r in rows}
    return 0 if len(best) == len(wanted) else 1


def _tp_options(text: str, devices: int) -> list[int]:
    if devices < 1:
        raise ValueError("--devices must be at least 1")
    try:
        options = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ValueError(f"--tp-options {text}: give whole numbers, e.g. 1,2,4,8") from None
    fitting = [t for t in options if t >= 1 and devices % t == 0]
    if not fitting:
        raise ValueError(f"--tp-options {text}: none divides {devices} devices")
    return fitting


def _setups(args, tp_options: list[int]) -> tuple[dict, list[str]]:
    """The cost model and engine settings for each TP size that can hold the model."""
    setups, skipped = {}, []
    for tp in tp_options:
        try:
            setups[tp] = sim_setup(argparse.Namespace(**{**vars(args), "prefill": 0,
                                                         "decode": 1, "tp": tp}))
        except MpiserveError as exc:
            skipped.append(f"TP {tp}: {exc}")
    if not setups:
        raise MpiserveError("no TP size works: " + "; ".join(skipped))
    return setups, skipped


def _row(run, layout: SimLayout, setup, workload: str, rate: float, requests) -> dict:
    result = simulate(requests, fresh_router(run.router), run.router, layout, setup.cost,
                      setup.config, dict(a.split("=", 1) for a in run.router_args))
    summary = summarize(result.records, {r.custom_id: r.arrival_s for r in requests})
    return {"router": run.label, "rate": rate, "workload": workload,
            "prefill": layout.prefill, "decode": layout.decode, "tp": layout.tp,
            "completed": summary["completed"], "num_requests": len(requests),
            **{k: summary.get(k) for k in FIGURES}, "failure": result.failure}


def best_layouts(rows: list[dict]) -> list[dict]:
    """Per router and rate, the row of lowest mean JCT among those that completed every
    request (none when no layout did)."""
    best: dict[tuple, dict] = {}
    for row in rows:
        if row["completed"] < row["num_requests"] or row["mean_jct"] is None:
            continue
        key = (row["router"], row["rate"])
        if key not in best or row["mean_jct"] < best[key]["mean_jct"]:
            best[key] = row
    return list(best.values())


def _table(best: list[dict], devices: int) -> str:
    lines = [f"Best layout on {devices} devices per router and rate (lowest mean JCT among "
             "layouts that completed every request):", "",
             "| router | rate | layout | mean JCT | p99 JCT | mean TTFT | mean TPOT |",
             "|---|---|---|---|---|---|---|"]
    for r in best:
        lines.append(f"| {r['router']} | {r['rate']:g} | {r['prefill']}P + {r['decode']}D, "
                     f"TP {r['tp']} | {_s(r['mean_jct'])} | {_s(r['p99_jct'])} | "
                     f"{_s(r['mean_ttft'])} | {_s(r['mean_tpot'], 4)} |")
    return "\n".join(lines)


def _s(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mpiserve plan", description=__doc__.splitlines()[0])
    add_arguments(parser)
    argv = sys.argv[1:] if argv is None else argv
    return run_plan(parser.parse_args(argv), argv)


if __name__ == "__main__":
    sys.exit(main())


"""The simulator against measurement (issue 11): the same workloads, arrival times and routers,
served by real `mpiexec` jobs and by simulated engines with a profile of this machine's engine.

    python -m mpiserve.bench.sim_validation [--workloads long,chat] [--routers LIST]
        [--num-requests 16] [--repeats 1] [--profile FILE] [--step-fit alone|in-job]
        [--out results]

Three public commands, run in turn: `mpiserve profile` on the benchmark model (unless
`--profile` gives one), then for each workload `mpiserve bench` (measured) and
`mpiserve simulate --profile --engines-per-host 2` (simulated: the measured job's two
engines share this host, and its steps slow each other's as the profile's co-run factors say)
with the same routers, rates, request count and seed. With `--step-fit in-job`, each workload
is simulated with the step model's prefill terms and the rest scaled (`mpiserve profile
--from-run --fit split`) to the steps the other workloads' measured jobs timed, so the cost of
a step inside a job (ranks sharing cores, the engine loop) is in the model while no job
predicts itself. Their strategies.json rows are
joined on (workload, router, rate) and compared on mean JCT and mean TTFT. With `--repeats R`
every measured job runs R times (the workloads taking turns, so the machine's drift falls on
each alike) and the simulation is set against their mean and their range. Writes
`sim_validation.json` and `.md` (`sim_validation_in_job.*` with `--step-fit in-job`) to
`--out`; the commands' own outputs stay in `--work-dir` (default: a temporary directory,
removed).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..option_types import whole_number
from .report_files import write_report
from .serving import SEED, mpiserve_command, resolve_model

ALL_ROUTERS = "round_robin,pd,balanced_pd:0.1,balanced_pd:auto,prefix_aware,adaptive"
RATES = {"long": "0.3", "chat": "2", "shared_prefix": "2"}
COMPARED = ("mean_jct", "mean_ttft")
ENGINES_PER_HOST = "2"           # the measured jobs' prefill and decode engine, on this host
STEP_FITS = {
    "alone": "Step times: fitted to steps of one engine timed alone, in-process "
             "(`mpiserve profile --model`).",
    "in-job": "Step times: for each workload, the step model of `mpiserve profile --model` "
              "with its prefill terms and the rest each scaled to fit the steps the measured "
              "jobs of the other workloads timed (`mpiserve profile --from-run --fit split`, "
              "their run directories' steps.json)."}


def say(message: str) -> None:
    print(f"sim_validation: {message}", file=sys.stderr, flush=True)


def run_step(words: list[str], log: Path) -> None:
    """Run one mpiserve command; its output goes to `log`; exits naming the log on failure."""
    say(shlex.join(words))
    with log.open("w") as out:
        code = subprocess.run(words, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        raise SystemExit(f"sim_validation: exit {code} from {words[1]} (log: {log})")


def rows_of(path: Path) -> dict[tuple, dict]:
    rows = json.loads(path.read_text())
    return {(r["workload"], r["router"], r["rate"]): r for r in rows}


def relative_error(simulated, measured) -> float | None:
    if simulated is None or not measured:
        return None
    return (simulated - measured) / measured


def compare(measured: list[dict[tuple, dict]], simulated: dict[tuple, dict]) -> list[dict]:
    """One row per (workload, router, rate) that every measured repeat and the simulation ran:
    the simulated figure against the mean of the measured repeats, and against their range."""
    keys = set(simulated).intersection(*measured)
    rows = []
    for key in sorted(keys, key=str):
        runs, s = [m[key] for m in measured], simulated[key]
        row = {"workload": key[0], "router": key[1], "rate": key[2],
               "completed": [[r["completed"] for r in runs], s["completed"]]}
        for name in COMPARED:
            values = [r.get(name) for r in runs]
            mean = None if None in values else sum(values) / len(values)
            row[f"measured_{name}"], row[f"simulated_{name}"] = mean, s.get(name)
            row[f"measured_{name}_runs"] = values
            row[f"{name}_error"] = relative_error(s.get(name), mean)
            row[f"{name}_inside_runs"] = _inside(s.get(name), values)
        rows.append(row)
    return rows


def _inside(simulated, values) -> bool | None:
    """Whether the simulated figure lies within the measured repeats' range (None: one run)."""
    if simulated is None or None in values or len(values) < 2:
        return None
    return min(values) <= simulated <= max(values)


def worst(rows: list[dict], name: str) -> float | None:
    errors = [abs(r[f"{name}_error"]) for r in rows if r[f"{name}_error"] is not None]
    return max(errors, default=None)


def counts(rows: list[dict], name: str) -> dict:
    """How many rows are within 10% of the measured mean, and inside the measured range."""
    return {"rows": len(rows),
            "within_10_percent": sum(r[f"{name}_error"] is not None
                                     and abs(r[f"{name}_error"]) <= 0.10 for r in rows),
            "inside_measured_runs": sum(bool(r[f"{name}_inside_runs"]) for r in rows)}


def fit_text(fit: dict) -> str:
    step, transfer, co_run = fit["step"], fit["transfer"], fit.get("co_run", {})
    return (f"step = {step['intercept_s'] * 1e3:.2f} ms + "
            f"{step['per_prefill_token_s'] * 1e6:.0f} us per prefill token + "
            f"{step['per_decode_seq_s'] * 1e6:.0f} us per decode sequence + "
            f"{step['per_context_token_s'] * 1e9:.0f} ns per context token + "
            f"{step.get('per_attention_pair_s', 0.0) * 1e12:.0f} ps per attention pair; "
            f"KV copy {transfer['latency_s'] * 1e6:.0f} us + "
            f"{transfer['per_byte_s'] * 1e12:.0f} ps per byte; beside a stepping neighbour, "
            f"prefill terms x {co_run.get('prefill', 1.0):.3f}, the rest x "
            f"{co_run.get('rest', 1.0):.3f}")


def markdown(report: dict) -> str:
    def pct(x):
        return "–" if x is None else f"{x * 100:+.1f}%"

    def sec(x):
        return "–" if x is None else f"{x:.2f}"

    def runs(values):
        return "–" if len(values) < 2 or None in values else \
            f"{min(values):.2f}–{max(values):.2f}"

    def size(x):
        return "–" if x is None else f"{x * 100:.1f}%"
    lines = ["# The simulator against measured runs", "",
             f"Command: `{report['command']}`", "",
             "Each row: the same seeded requests and Poisson arrival times, served once by a "
             f"real `mpiexec -n 3` job (1 prefill + 1 decode engine, `mpiserve bench`; "
             f"{report['repeats']} job(s) each, measured = their mean, range = the lowest and "
             "highest of them) and once "
             "by simulated engines whose step and KV-copy times come from `mpiserve profile` "
             "of the same model on this machine (`mpiserve simulate --profile "
             f"--engines-per-host {ENGINES_PER_HOST}`: the job's two engines share this host "
             "and slow each other's steps by the profile's co-run factors). Error = "
             "(simulated - measured) / measured.", "", STEP_FITS[report["step_fit"]], ""]
    for workload, fit in report["profile_fits"].items():
        lines += [f"Profile for `{workload}` ({fit['source']}): {fit_text(fit)}.", ""]
    lines += [
             "| workload | router | rate | mean JCT measured | range | simulated | error "
             "| mean TTFT measured | range | simulated | error |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['workload']} | {r['router']} | {r['rate']:g} "
                     f"| {sec(r['measured_mean_jct'])} | {runs(r['measured_mean_jct_runs'])} "
                     f"| {sec(r['simulated_mean_jct'])} | {pct(r['mean_jct_error'])} "
                     f"| {sec(r['measured_mean_ttft'])} | {runs(r['measured_mean_ttft_runs'])} "
                     f"| {sec(r['simulated_mean_ttft'])} | {pct(r['mean_ttft_error'])} |")
    lines += ["", f"Largest error (either sign): mean JCT {size(report['worst_mean_jct_error'])}, "
              f"mean TTFT {size(report['worst_mean_ttft_error'])} (target: within 10%).", ""]
    for name, label in (("mean_jct", "Mean JCT"), ("mean_ttft", "Mean TTFT")):
        c = report["counts"][name]
        lines.append(f"{label}: within 10% of the measured mean in {c['within_10_percent']} of "
                     f"{c['rows']} rows; inside the measured jobs' range in "
                     f"{c['inside_measured_runs']}.")
    lines.append("")
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="long,chat", help="comma list (default %(default)s)")
    parser.add_argument("--routers", default=ALL_ROUTERS, help="comma list (default: all)")
    parser.add_argument("--num-requests", type=int, default=16, help="requests per run")
    parser.add_argument("--repeats", type=whole_number(1), default=1,
                        help="measured jobs per row: the simulation is compared with their "
                             "mean and range (default 1)")
    parser.add_argument("--seed", type=int, default=SEED, help="workload seed")
    parser.add_argument("--profile", help="a profile from `mpiserve profile` (default: "
                        "measure the benchmark model now)")
    parser.add_argument("--step-fit", choices=["alone", "in-job"], default="alone",
                        help="alone: the step model of --profile (steps timed in-process); "
                             "in-job: for each workload, scaled to the steps the measured "
                             "jobs of the other workloads timed (default %(default)s)")
    parser.add_argument("--out", default="results", help="output directory")
    parser.add_argument("--work-dir", help="keep the commands' outputs and logs here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="mpiserve-simval-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        report = validate(args, work)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    report["command"] = "python -m mpiserve.bench.sim_validation " + shlex.join(argv)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    name = "sim_validation" if args.step_fit == "alone" else "sim_validation_in_job"
    write_report(Path(args.out), name, report, markdown(report))
    say(f"largest error: mean JCT {report['worst_mean_jct_error']}, mean TTFT "
        f"{report['worst_mean_ttft_error']}")
    return 0


def validate(args, work: Path) -> dict:
    mpiserve = mpiserve_command()
    model, _, _ = resolve_model(argparse.Namespace(model=None, quick=False))
    profile = Path(args.profile) if args.profile else work / "profile.json"
    if not args.profile:
        run_step([*mpiserve, "profile", "--model", model, "--out", str(profile)],
                 work / "profile.log")
    workloads = args.workloads.split(",")
    common = {w: ["--workload", w, "--routers", args.routers, "--rates", RATES.get(w, "1"),
                  "--num-requests", str(args.num_requests), "--seed", str(args.seed)]
              for w in workloads}
    for repeat in range(args.repeats):           # workloads alternate: drift hits each alike
        for workload in workloads:
            tag = f"{workload}-{repeat}"
            run_step([*mpiserve, "bench", *common[workload],
                      "--out", str(work / f"{tag}-measured"),
                      "--work-dir", str(work / f"{tag}-runs")], work / f"{tag}-bench.log")
    rows, fits = [], {}
    for workload in workloads:
        used = profile if args.step_fit == "alone" else \
            _in_job_profile(mpiserve, work, profile, workload, [w for w in workloads
                                                                if w != workload])
        simulated = work / f"{workload}-simulated"
        run_step([*mpiserve, "simulate", *common[workload], "--profile", str(used),
                  "--engines-per-host", ENGINES_PER_HOST, "--out", str(simulated)],
                 work / f"{workload}-simulate.log")
        measured = [rows_of(work / f"{workload}-{i}-measured" / "strategies.json")
                    for i in range(args.repeats)]
        rows += compare(measured, rows_of(simulated / "strategies.json"))
        fit = json.loads(used.read_text())
        fits[workload] = {"step": fit["step"], "transfer": fit["transfer"],
                          "co_run": fit.get("co_run"), "source": fit.get("source")}
    return {"rows": rows, "step_fit": args.step_fit, "profile_fits": fits,
            "repeats": args.repeats, "counts": {n: counts(rows, n) for n in COMPARED},
            "worst_mean_jct_error": worst(rows, "mean_jct"),
            "worst_mean_ttft_error": worst(rows, "mean_ttft")}


def _in_job_profile(mpiserve: list[str], work: Path, base: Path, workload: str,
                    others: list[str]) -> Path:
    """A profile whose step model is fitted to the steps the measured jobs of the `others`
    workloads timed: the jobs being predicted take no part in their own prediction. Prefill
    terms and the rest get a factor each: inside jobs here, large prefill steps ran ~1.1x the
    base model and decode steps 0.87-1.0x, so one factor from `chat`'s decode-heavy jobs
    underestimated `long`'s prefills (results/README.md)."""
    if not others:
        raise SystemExit("sim_validation: --step-fit in-job needs two workloads or more (each "
                         "is predicted from the others' jobs)")
    runs = sorted(str(d) for w in others for d in work.glob(f"{w}-*-runs/*.run"))
    out = work / f"{workload}-profile-from-jobs.json"
    run_step([*mpiserve, "profile", "--from-run", *runs, "--fit", "split", "--base", str(base),
              "--out", str(out)], work / f"{workload}-profile-from-jobs.log")
    return out


if __name__ == "__main__":
    sys.exit(main())

"""The `mpiserve` command."""

from __future__ import annotations

import argparse
import os
import sys

from .engine.engine_config import EngineConfig
from .errors import MpiserveError
from .option_types import seconds


def _engine_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", help="Hugging Face checkpoint directory (default: the built-in "
                   "demo model, generated on first use)")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="serving dtype (default: the checkpoint's)")
    g.add_argument("--page-size", type=int, default=16, help="tokens per KV page")
    g.add_argument("--kv-cache-gib", type=float, default=0.5, help="KV page pool per engine")
    g.add_argument("--num-pages", type=int, help="KV pages per engine (overrides --kv-cache-gib)")
    g.add_argument("--max-num-seqs", type=int, default=64,
                   help="sequences an engine runs at once")
    g.add_argument("--max-batch-tokens", type=int, default=1024,
                   help="tokens computed per engine step (chunked prefill budget)")
    g.add_argument("--max-model-len", type=int,
                   help="context length (default: the checkpoint's)")
    g.add_argument("--torch-threads", type=int, default=1, help="torch threads per rank")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--matmul-dtype", default="auto",
                   choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype the linear layers multiply in; auto: a half-precision model "
                   "multiplies in float32 on a CPU where that measures faster")


def engine_config(args) -> EngineConfig:
    return EngineConfig(model=args.model, dtype=args.dtype, page_size=args.page_size,
                        kv_cache_gib=args.kv_cache_gib, num_pages=args.num_pages,
                        max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                        max_model_len=args.max_model_len, torch_threads=args.torch_threads,
                        device=args.device, matmul_dtype=args.matmul_dtype)


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not key=value")
    return key, value


class _ShowDefaults(argparse.HelpFormatter):
    """Every option with a default shows it in --help, with or without a help text."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        shown = action.default not in (None, False, argparse.SUPPRESS) and action.option_strings
        if shown and "%(default)" not in text and "default:" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


# A job's ranks load nothing before MPI starts that the job does not use: with the simulator's
# modules imported first, MPI_Init of a two-node srun job failed (a garbled PMI2 request).
JOB_COMMANDS = ("run", "serve")


def build_parser(simulator: bool = True) -> argparse.ArgumentParser:
    """`simulator`: include simulate, plan and profile (left out for a job's ranks)."""
    parser = argparse.ArgumentParser(prog="mpiserve", description="Serve LLMs as one MPI job.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve a batch file (start with mpiexec -n 1+P+D)",
                         description="Rank 0 routes; ranks 1..P prefill; the rest decode.",
                         formatter_class=_ShowDefaults)
    run.add_argument("--input", required=True, help="OpenAI batch JSONL input")
    run.add_argument("--output", required=True, help="OpenAI batch JSONL output (appended; "
                     "records already there are skipped, so a re-run resumes)")
    _job_arguments(run)
    run.add_argument("--record-itl", action="store_true",
                     help="add each request's inter-token latencies (seconds) to its metrics")
    serve = sub.add_parser("serve", help="serve OpenAI-compatible HTTP (start with mpiexec "
                           "-n 1+P+D)", formatter_class=_ShowDefaults,
                           description="Rank 0 answers /v1/completions, /v1/chat/completions, "
                           "/v1/models, /health and /metrics; the engines are as in `run`. "
                           "SIGTERM stops accepting, lets requests in flight finish, exits 3.")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free)")
    serve.add_argument("--api-key",
                       help="require 'Authorization: Bearer KEY' on every route but /health "
                            "(default: env MPISERVE_API_KEY)")
    _job_arguments(serve)
    from .bench.serving import add_arguments as bench_arguments
    bench = sub.add_parser("bench", help="serving benchmark: one workload under several "
                           "routers, each run a fresh mpiexec job",
                           description="Serve one workload (seeded prompts, Poisson arrivals) "
                           "with each router in turn; write strategies.json, .md and plots.")
    bench_arguments(bench)
    if simulator:
        _simulator_commands(sub)
    return parser


def _simulator_commands(sub) -> None:
    from .sim.simulate_command import add_arguments as simulate_arguments
    simulate = sub.add_parser("simulate", help="the same routers and workloads as bench, on "
                              "simulated engines with a virtual clock (seconds of CPU)",
                              description="Serve a workload with each router on simulated "
                              "engines (the real scheduler and page bookkeeping, a cost model "
                              "for compute and KV transfer); write strategies.json rows marked "
                              "simulated, .md and plots.")
    simulate_arguments(simulate)
    from .sim.plan_command import add_arguments as plan_arguments
    plan = sub.add_parser("plan", help="the best prefill:decode split and TP size for a "
                          "number of devices, per router and rate, by simulation",
                          description="Simulate every layout of prefill and decode engines "
                          "on --devices devices; print the best per router and rate, write "
                          "plan.json.")
    plan_arguments(plan)
    from .sim.profile_command import add_arguments as profile_arguments
    profile = sub.add_parser("profile", help="measure this machine's engine for the "
                             "simulator: a JSON profile of step and KV-copy times",
                             description="Time short engine steps of the real engine "
                             "in-process and fit the simulator's step-time model.")
    profile_arguments(profile)


def _job_arguments(job: argparse.ArgumentParser) -> None:
    """The layout, router, fault and engine options that `run` and `serve` share."""
    job.add_argument("--prefill", type=int, help="prefill engines (default: half the engines)")
    job.add_argument("--decode", type=int, help="decode engines (default: the rest)")
    job.add_argument("--tp", type=int, default=1,
                     help="tensor-parallel size of every engine: ranks per engine (the world "
                          "size is then 1 + P*prefill_tp + D*decode_tp)")
    job.add_argument("--prefill-tp", type=int, help="tensor-parallel size of the prefill "
                     "engines (default: --tp)")
    job.add_argument("--decode-tp", type=int, help="tensor-parallel size of the decode engines "
                     "(default: --tp)")
    job.add_argument("--router", default="round_robin",
                     help="round_robin, pd, balanced_pd, prefix_aware, adaptive, or "
                          "path/to/file.py:function")
    job.add_argument("--router-arg", action="append", type=_key_value, default=[],
                     metavar="KEY=VALUE", help="option for the router (cluster.args)")
    job.add_argument("--max-inflight", type=int, default=256,
                     help="requests the router works on at once (serve: more get 429)")
    job.add_argument("--drain-timeout", type=float, default=60.0,
                     help="after SIGTERM/SIGINT, seconds to let requests in flight finish")
    job.add_argument("--transfer-timeout", type=float, default=60.0,
                     help="seconds before a KV transfer is given up (the request recomputes)")
    job.add_argument("--heartbeat-timeout", type=float, default=120.0,
                     help="seconds of silence after which an engine rank counts as dead "
                          "(the job then exits 1; requests in flight are left for the re-run)")
    job.add_argument("--request-timeout", type=float, default=600.0,
                     help="seconds a request's router may take; then the request is aborted "
                          "on the engines and answered with a request_timeout error")
    job.add_argument("--mpi-start-timeout", type=seconds(0, inclusive=False), default=300.0,
                     help="seconds a rank may wait in MPI_Init (a launcher whose start-up "
                          "failed can leave it waiting forever); then the rank exits 1")
    job.add_argument("--bind-interface", metavar="NAME",
                     help="network interface whose address rank 0 offers the other ranks for "
                          "the data plane (default: chosen from the subnet the nodes share; "
                          "env MPISERVE_BIND_INTERFACE)")
    job.add_argument("--dashboard", choices=["auto", "live", "plain", "off"], default="auto",
                     help="live table on the terminal, a progress line every few seconds "
                          "(plain), or nothing; auto: live on a terminal, else plain")
    job.add_argument("--run-dir", help="where the run report goes: summary.json and plots "
                     "(default: <output stem>.run/ beside the output file; serve: "
                     "mpiserve-serve.run/)")
    job.add_argument("--fail-transfers", type=int, default=0, help=argparse.SUPPRESS)
    _engine_arguments(job)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(simulator=not argv or argv[0] not in JOB_COMMANDS).parse_args(argv)
    try:
        if args.command == "bench":
            from .bench.serving import run_bench
            return run_bench(args, argv[1:])
        if args.command == "simulate":
            from .sim.simulate_command import run_simulate
            return run_simulate(args, argv[1:])
        if args.command == "plan":
            from .sim.plan_command import run_plan
            return run_plan(args, argv[1:])
        if args.command == "profile":
            from .sim.profile_command import run_profile
            return run_profile(args)
        if args.command in ("run", "serve"):
            from .job import run_job
            if args.bind_interface:      # read by cluster.bringup on every rank
                os.environ["MPISERVE_BIND_INTERFACE"] = args.bind_interface
            return run_job(job_options(args))
    except MpiserveError as exc:
        if not getattr(exc, "quiet", False):     # quiet: another rank prints the same error
            print(f"mpiserve: error: {exc}", file=sys.stderr)
        return 2
    return 0


def job_options(args):
    """The options of a `run` or `serve` job from its parsed arguments."""
    from .job import JobOptions
    serve = None
    if args.command == "serve":
        from .online.server import ServeOptions
        serve = ServeOptions(args.host, args.port,
                             args.api_key or os.environ.get("MPISERVE_API_KEY") or None)
    return JobOptions(
        input=getattr(args, "input", None), output=getattr(args, "output", None),
        router=args.router, router_args=dict(args.router_arg), prefill=args.prefill,
        decode=args.decode, prefill_tp=args.tp if args.prefill_tp is None else args.prefill_tp,
        decode_tp=args.tp if args.decode_tp is None else args.decode_tp,
        max_inflight=args.max_inflight, drain_timeout_s=args.drain_timeout,
        record_itl=getattr(args, "record_itl", False), dashboard=args.dashboard,
        run_dir=args.run_dir, transfer_timeout_s=args.transfer_timeout,
        heartbeat_timeout_s=args.heartbeat_timeout, request_timeout_s=args.request_timeout,
        fail_transfers=args.fail_transfers, mpi_start_timeout_s=args.mpi_start_timeout,
        engine=engine_config(args), serve=serve)


if __name__ == "__main__":
    sys.exit(main())

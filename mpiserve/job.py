"""`mpiserve run` and `mpiserve serve`: one MPI job. Rank 0 routes, and writes results to a file
(run) or answers HTTP requests (serve); every other rank is an engine."""

from __future__ import annotations

import asyncio
import faulthandler
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .cluster.layout import ROUTER_RANK, JobLayout
from .engine.engine_config import EngineConfig
from .errors import MpiserveError

if TYPE_CHECKING:                         # uvicorn is imported only by `serve`
    from .online.server import ServeOptions

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3
ABORT_GRACE_S = 0.5
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@dataclass(frozen=True)
class JobOptions:
    input: str | None                     # None: `serve` (then `serve` holds its options)
    output: str | None
    router: str = "round_robin"
    router_args: dict = field(default_factory=dict)
    prefill: int | None = None
    decode: int | None = None
    prefill_tp: int = 1                   # ranks per prefill engine (tensor parallelism)
    decode_tp: int = 1
    max_inflight: int = 256
    drain_timeout_s: float = 60.0
    record_itl: bool = False
    dashboard: str = "auto"
    run_dir: str | None = None
    transfer_timeout_s: float = 60.0
    heartbeat_timeout_s: float = 120.0
    request_timeout_s: float = 600.0
    fail_transfers: int = 0
    mpi_start_timeout_s: float = 300.0
    engine: EngineConfig = EngineConfig()
    serve: ServeOptions | None = None     # set for `mpiserve serve`


def say(message: str) -> None:
    print(f"mpiserve: {message}", file=sys.stderr, flush=True)


_stop_requested: list[int] = []     # stop signals that came before rank 0 could act on them


def _record_stop(signum, frame) -> None:
    _stop_requested.append(signum)


def _defer_stop_signals() -> None:
    """Until a rank installs its real handling (rank 0: drain; engines: ignore), a stop signal
    is only recorded: the default action would kill the rank mid-startup and end the job
    with a signal instead of the resumable exit 3. Calls restart after the handler runs."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, _record_stop)
        signal.siginterrupt(sig, False)


def run_job(options: JobOptions) -> int:
    _defer_stop_signals()                 # before MPI init, model load, data plane bring-up
    MPI = _start_mpi(options.mpi_start_timeout_s)
    try:
        return _run_rank(MPI.COMM_WORLD, options)
    finally:
        # explicitly, not left to mpi4py's exit hook: a rank 0 that once left without it
        # (1 run in ~10, exit 0, no PMI barrier) made hydra SIGKILL the finalizing engines
        if not MPI.Is_finalized():
            MPI.Finalize()


def _start_mpi(timeout_s: float):
    """Import mpi4py, which runs MPI_Init, and return its MPI module; past `timeout_s` the rank
    prints where it waited ("Timeout" and this function's frame) and exits 1.

    MPI_Init can wait forever: a launcher whose own start-up failed (seen: srun's PMI2 exchange
    garbled) leaves the ranks spinning in it. It holds the GIL, so the bound is faulthandler's
    watchdog, a C thread that needs none."""
    faulthandler.dump_traceback_later(timeout_s, exit=True)
    try:
        from mpi4py import MPI
    finally:
        faulthandler.cancel_dump_traceback_later()
    return MPI


def _run_rank(comm, options: JobOptions) -> int:
    rank = comm.Get_rank()
    layout = JobLayout.infer(comm.Get_size(), options.prefill, options.decode,
                             options.prefill_tp, options.decode_tp)
    problem = layout.problem()
    if problem:
        if rank == ROUTER_RANK:
            say(f"error: {problem}")
        return EXIT_USAGE
    prepared = _prepare_router(options) if rank == ROUTER_RANK else None
    if not comm.bcast(prepared is not None and not isinstance(prepared, str), root=ROUTER_RANK):
        if rank == ROUTER_RANK:
            say(f"error: {prepared}")
        return EXIT_USAGE
    from .cluster.bringup import init_data_plane
    from .cluster.tensor_group import join_job_groups
    init_data_plane(comm, timeout_s=options.heartbeat_timeout_s)
    shard = join_job_groups(comm, layout)
    if rank == ROUTER_RANK:
        return _router_rank(comm, layout, options, prepared)
    tp, plans = shard
    if rank != layout.group_of(rank).lead:
        return _follower_rank(comm, layout, options, tp, plans)
    return _engine_rank(comm, layout, options, tp, plans)


def _prepare_router(options: JobOptions):
    """Everything rank 0 must check before the engines load: router, input, output, model."""
    from .batch.input_file import read_batch
    from .batch.output_file import BatchOutput
    from .model.checkpoint import check_weights
    from .model.default_model import default_model
    from .model.model_config import ModelConfig
    from .model.tensor_shard import TensorShard
    from .model.tokenizer import Tokenizer
    from .router.loader import load_router
    try:
        route = load_router(options.router)
        items = read_batch(options.input) if options.serve is None else None
        model_dir = options.engine.model or str(default_model())
        config = ModelConfig.from_dir(model_dir)
        if not str(model_dir).endswith(".gguf"):   # GGUF files are checked as they load
            check_weights(model_dir, config)
        tokenizer = Tokenizer.from_dir(model_dir)
        for size in sorted({options.prefill_tp, options.decode_tp} - {1}):
            problem = TensorShard(size).problem(config)
            if problem:
                return f"{model_dir}: cannot be split over {size} ranks: {problem}"
        if options.serve is not None:
            from .online.listen_check import check_listen
            check_listen(options.serve.host, options.serve.port)
        output = BatchOutput(options.output) if options.serve is None else None
    except MpiserveError as exc:
        return str(exc)
    except OSError as exc:                # unexpected, but the other ranks wait on the answer
        return f"{exc.filename or 'input/output'}: {exc.strerror or exc}"
    return route, items, model_dir, config, tokenizer, output


def _engine_rank(comm, layout: JobLayout, options: JobOptions, tp, plans) -> int:
    """An engine's lead rank (the whole engine when it has one rank): serves the router."""
    from .cluster.control import ControlChannel
    from .cluster.engine_worker import EngineWorker, WorkerOptions, report_fatal
    from .cluster.heartbeat import HeartbeatSender, heartbeat_interval
    from .engine.engine import Engine
    for sig in STOP_SIGNALS:               # rank 0 decides how the job stops
        signal.signal(sig, signal.SIG_IGN)
    worker = None
    heartbeat = HeartbeatSender(comm, heartbeat_interval(options.heartbeat_timeout_s)).start()
    try:
        engine = Engine(options.engine, tp, plans)
        worker = EngineWorker(comm, engine, layout.role(comm.Get_rank()), WorkerOptions(
            transfer_timeout_s=options.transfer_timeout_s, fail_transfers=options.fail_transfers))
        worker.run()
        if plans is not None:             # the other ranks of the group stop following
            plans.publish(None)
            plans.flush()
        worker.report_final(heartbeats_sent=heartbeat.stop())
    except BaseException as exc:          # report, then let rank 0 end the job
        report_fatal(worker.control if worker is not None else ControlChannel(comm), exc)
        _wait_for_abort(comm, options.heartbeat_timeout_s)
        return EXIT_FAILED
    _close_data_plane()
    return EXIT_OK


def _follower_rank(comm, layout: JobLayout, options: JobOptions, tp, plans) -> int:
    """A non-lead rank of a tensor-parallel engine: runs its shard of every step the lead
    plans, until the lead says stop. A failure is reported to rank 0 naming the group."""
    from .cluster.control import ControlChannel
    from .cluster.engine_worker import report_fatal
    from .cluster.heartbeat import HeartbeatSender, heartbeat_interval
    from .cluster.messages import FollowerFinal
    from .cluster.tp_follower import Follower
    from .engine.engine import Engine
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    group = layout.group_of(comm.Get_rank())
    # rank 0 watches followers too: a hung follower stalls its lead inside a collective,
    # while the lead's own heartbeat thread would go on beating
    heartbeat = HeartbeatSender(comm, heartbeat_interval(options.heartbeat_timeout_s)).start()
    try:
        Follower(Engine(options.engine, tp), plans, options.transfer_timeout_s).run()
        control = ControlChannel(comm)
        control.send(ROUTER_RANK, FollowerFinal(comm.Get_rank(), heartbeat.stop()))
        control.flush()
    except BaseException as exc:
        report_fatal(ControlChannel(comm), exc, f"rank {comm.Get_rank()} of the {group.role} "
                     f"engine led by rank {group.lead} (ranks {group.ranks.start}-"
                     f"{group.ranks.stop - 1}, TP {group.size}):\n")
        _wait_for_abort(comm, options.heartbeat_timeout_s)
        return EXIT_FAILED
    _close_data_plane()
    return EXIT_OK


def _wait_for_abort(comm, timeout_s: float) -> None:
    """After reporting a failure: rank 0 aborts the job; if it never does, abort ourselves."""
    time.sleep(timeout_s)
    comm.Abort(EXIT_FAILED)


def _close_data_plane() -> None:
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def _router_rank(comm, layout: JobLayout, options: JobOptions, prepared) -> int:
    route, items, model_dir, config, tokenizer, output = prepared
    try:
        tally = asyncio.run(_serve(comm, layout, options, route, items, model_dir, config,
                                   tokenizer, output))
        _defer_stop_signals()             # asyncio put back the defaults; the work is done
    except BaseException as exc:
        if output is not None:
            output.close()
        say(f"job failed: {exc}" if isinstance(exc, RuntimeError) else traceback.format_exc())
        time.sleep(ABORT_GRACE_S)         # MPI_Abort can outrun the launcher's stderr forwarding
        comm.Abort(EXIT_FAILED)
        return EXIT_FAILED
    if output is not None:
        output.close()
    _close_data_plane()
    if tally.interrupted:
        written = "answered" if options.serve is not None else "written"
        resume = "" if options.serve is not None else "; run the same command again to resume"
        say(f"stopped by a signal: {tally.completed} completed, {tally.failed} errors {written}, "
            f"{tally.abandoned} in flight dropped{resume} (exit {EXIT_STOPPED})")
        return EXIT_STOPPED
    say(f"done: {tally.completed} completed, {tally.failed} errors, {tally.skipped} already "
        f"in {options.output}; {tally.generated_tokens} tokens in "
        f"{time.monotonic() - tally.started:.1f} s")
    return EXIT_OK


async def _serve(comm, layout, options, route, items, model_dir, config, tokenizer, output):
    from .batch.input_file import count_records
    from .cluster.control import ControlChannel
    from .cluster.messages import Shutdown
    from .dashboard.observer import JobObserver
    from .router.cluster import Cluster
    from .router.dispatcher import Dispatcher, EngineFailure
    from .router.request_prompt import ModelLimits
    control = ControlChannel(comm)
    followers = {rank: group.lead for group in layout.groups for rank in group.ranks
                 if rank != group.lead}
    dispatcher = Dispatcher(control, layout.engine_ranks, options.heartbeat_timeout_s,
                            followers)
    roles = {rank: layout.role(rank) for rank in layout.engine_ranks}
    tp = {group.lead: group.size for group in layout.groups}
    cluster = Cluster(dispatcher, roles, options.engine.page_size, options.router_args, tp)
    name = Path(options.engine.model).name if options.engine.model else "mpiserve-demo"
    limits = ModelLimits(name, config.vocab_size,
                         min(options.engine.max_model_len or 1 << 62, config.context_limit))
    runner = _runner(options, cluster, route, tokenizer, limits, output)
    observer = JobObserver(options.dashboard, job_info(options, comm.Get_size(), name, roles, tp),
                           dispatcher, cluster, runner.tally, run_dir(options))
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, runner.stop)
    if _stop_requested:                   # stopped while the job was starting up
        runner.stop()
    stop, watching = asyncio.Event(), asyncio.Event()
    pump = asyncio.create_task(dispatcher.pump(stop))
    watch = asyncio.create_task(observer.run(watching))
    try:
        try:
            if options.serve is None:
                tally = await runner.run(items, total=count_records(options.input))
            else:
                from .online.server import serve_http
                tally = await serve_http(runner, options.serve, options.drain_timeout_s)
        finally:
            stop.set()
            await pump
        control.broadcast(layout.engine_ranks, Shutdown())
        # an engine still loading (a stop during start-up) answers once loaded; rank 0 must not
        # exit before, or the launcher kills it mid-load (exit 9 instead of 3)
        unfinished = await dispatcher.collect_final_stats(options.heartbeat_timeout_s)
        control.flush()
    finally:
        watching.set()
        await watch
    observer.finish()
    if unfinished:                        # MPI_Finalize would wait for them for ever
        raise EngineFailure(f"engine rank(s) {', '.join(map(str, unfinished))} did not finish "
                            f"within {options.heartbeat_timeout_s:g} s of the end (the output "
                            "holds every record written)")
    return tally


def _runner(options: JobOptions, cluster, route, tokenizer, limits, output):
    """Rank 0's requests: from the input file (BatchRunner) or from HTTP (OnlineRunner)."""
    if options.serve is not None:
        from .online.online_runner import OnlineRunner
        return OnlineRunner(cluster, route, options.router, tokenizer, limits,
                            options.max_inflight, options.request_timeout_s)
    from .router.batch_runner import BatchRunner
    return BatchRunner(cluster, route, options.router, tokenizer, limits, output,
                       options.max_inflight, options.drain_timeout_s,
                       record_itl=options.record_itl, request_timeout_s=options.request_timeout_s)


def run_dir(options: JobOptions) -> Path:
    """Where the run report goes: --run-dir, else `<output stem>.run/` beside the output
    (serve: `mpiserve-serve.run/` in the working directory)."""
    if options.run_dir:
        return Path(options.run_dir)
    if options.output is None:
        return Path("mpiserve-serve.run")
    output = Path(options.output)
    return output.with_name(f"{output.stem}.run")


def job_info(options: JobOptions, world_size: int, model: str, roles: dict[int, str],
             tp: dict[int, int]) -> dict:
    """The job's configuration, as the dashboard and the run report show it."""
    from .model.default_model import random_weights_note
    return {"model": model, "note": random_weights_note(options.engine.model) or "",
            "router": options.router, "router_args": dict(options.router_args),
            "world_size": world_size, "engines": dict(roles), "tensor_parallel": dict(tp),
            "input": options.input if options.serve is None else
            f"http://{options.serve.host}:{options.serve.port}",
            "output": options.output, "max_inflight": options.max_inflight,
            "engine": asdict(options.engine)}

"""uvicorn inside rank 0's asyncio loop, next to the dispatcher and the dashboard. The job,
not uvicorn, owns the stop signals: a stop closes the listening socket, lets the requests in
flight finish (for at most the drain time), and returns."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass

import uvicorn

from .http_app import build_app
from .online_runner import OnlineRunner


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None


class _JobServer(uvicorn.Server):
    """A uvicorn server that leaves the signals to the job."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


async def serve_http(runner: OnlineRunner, options: ServeOptions, drain_timeout_s: float):
    """Serve until a stop (runner.stop) or a lost engine; returns the runner's tally."""
    config = uvicorn.Config(build_app(runner, options.api_key), host=options.host,
                            port=options.port, log_level="warning", lifespan="off",
                            timeout_graceful_shutdown=drain_timeout_s, access_log=False)
    server = _JobServer(config)
    watch = asyncio.create_task(_stop_when(runner, server))
    announce = asyncio.create_task(_announce(server, options))
    try:
        await server.serve()
    finally:
        watch.cancel()
        announce.cancel()
    await _abandon_leftovers(runner, drain_timeout_s)
    runner.cluster.check_engines()
    return runner.tally


async def _abandon_leftovers(runner: OnlineRunner, timeout_s: float) -> None:
    """Requests still running when the drain time ran out: aborted on the engines (their
    tasks count them), while the dispatcher still runs to carry the aborts."""
    tasks = [online.task for online in runner.live.values() if online.task is not None]
    for online in list(runner.live.values()):
        runner.abort(online)
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)


async def _stop_when(runner: OnlineRunner, server: uvicorn.Server) -> None:
    stop = asyncio.ensure_future(runner.stopping.wait())
    lost = asyncio.ensure_future(runner.cluster.engine_failed())
    try:
        await asyncio.wait({stop, lost}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
        lost.cancel()
    server.should_exit = True


async def _announce(server: uvicorn.Server, options: ServeOptions) -> None:
    while not server.started:
        await asyncio.sleep(0.05)
    host, port = server.servers[0].sockets[0].getsockname()[:2]
    auth = " (API key required)" if options.api_key else ""
    print(f"mpiserve: serving http://{host}:{port}/v1{auth}", file=sys.stderr, flush=True)

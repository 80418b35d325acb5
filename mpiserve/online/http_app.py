"""The HTTP surface of `mpiserve serve` (starlette): OpenAI's `/v1/completions`,
`/v1/chat/completions` (whole or streamed as server-sent events) and `/v1/models`, plus
`/health` and `/metrics` (Prometheus). With an API key, every route but `/health` wants
`Authorization: Bearer <key>`."""

from __future__ import annotations

import hmac
import json
import time

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from . import prometheus
from .online_runner import ApiError, OnlineRunner
from .sse_stream import sse_events

OPEN_PATHS = ("/health",)


def build_app(runner: OnlineRunner, api_key: str | None, started: float | None = None
              ) -> Starlette:
    created = int(started or time.time())

    async def completions(http: HttpRequest) -> Response:
        return await _answer(runner, http, "completion")

    async def chat(http: HttpRequest) -> Response:
        return await _answer(runner, http, "chat")

    async def models(http: HttpRequest) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": runner.limits.name, "object": "model", "created": created,
             "owned_by": "mpiserve", "max_model_len": runner.limits.max_model_len}]})

    async def health(http: HttpRequest) -> Response:
        try:
            runner.cluster.check_engines()
        except Exception as failure:
            return JSONResponse({"status": "failed", "error": str(failure)}, status_code=503)
        ready = runner.cluster.engines_ready()
        return JSONResponse({"status": "ok" if ready else "loading"},
                            status_code=200 if ready else 503)

    async def metrics(http: HttpRequest) -> Response:
        text = prometheus.render(runner.outcomes, len(runner.live),
                                 runner.tally.generated_tokens, runner.cluster.engine_stats,
                                 runner.histograms)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    app = Starlette(routes=[
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/models", models),
        Route("/health", health),
        Route("/metrics", metrics),
    ])
    return _BearerAuth(app, api_key) if api_key else app


class _BearerAuth:
    """ASGI middleware: 401 unless `Authorization: Bearer <key>` (constant-time compare)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = ApiError(401, "a valid API key is required: Authorization: Bearer <key>",
                                 "invalid_api_key")
                await _error(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class _EventStream(StreamingResponse):
    """A streamed answer that aborts its request however the stream ends early: the client
    went away (a write fails) or the server stopped it."""

    def __init__(self, runner: OnlineRunner, online, include_usage: bool):
        super().__init__(sse_events(runner, online, include_usage),
                         media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.runner, self.online = runner, online

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.runner.abort(self.online)


def _error(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def _answer(runner: OnlineRunner, http: HttpRequest, kind: str) -> Response:
    try:
        body = json.loads(await http.body())
    except ValueError as err:
        return _error(ApiError(400, f"the request body is not JSON: {err}"))
    try:
        online = runner.start(body, kind)
    except ApiError as error:
        return _error(error)
    if body.get("stream"):
        options = body.get("stream_options") or {}
        return _EventStream(runner, online, bool(options.get("include_usage")))
    ended = await runner.outcome(online, http.is_disconnected)
    if ended is None:                        # the client left: nobody reads an answer
        return Response(status_code=499)
    if ended.error is not None:
        return _error(ended.error)
    return JSONResponse(runner.whole_body(online))

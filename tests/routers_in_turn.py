"""A router for tests: request i goes through built-in router i mod 5, so that one job runs
every built-in router (`--router tests/routers_in_turn.py:every_builtin`)."""

import itertools

from mpiserve.routers import BUILTIN_ROUTERS

_turn = itertools.count()
_ROUTERS = list(BUILTIN_ROUTERS.values())


async def every_builtin(request, cluster):
    route = _ROUTERS[next(_turn) % len(_ROUTERS)]
    async for tokens in route(request, cluster):
        yield tokens

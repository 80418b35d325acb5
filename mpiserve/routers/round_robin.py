"""Data parallel: each request runs whole on one engine, engines taken in turn."""

import itertools

_turn = itertools.count()


async def round_robin(request, cluster):
    engine = cluster.engines[next(_turn) % len(cluster.engines)]
    cluster.note_strategy(request, "data_parallel")
    async for tokens in engine.start_generate(request):
        yield tokens

"""Adaptive: picks a strategy per request from live load and prompt length.

While every engine is idle, a request runs whole on one engine (data parallel): nothing else
competes, and a split would only add a KV transfer before the decode engine's part. Short
prompts (`--router-arg short_prompt=256` tokens or fewer) also run whole, on the least loaded
engine. Once requests overlap, long prompts go through `balanced_pd`, whose split is chosen from
the engines' measured speeds and queues, so prefill work is shared instead of queueing on one
engine. The `strategy` metric of each request says which was chosen.
"""

from .balanced_pd import balanced_pd


async def adaptive(request, cluster):
    short = len(request.prompt) <= int(cluster.args.get("short_prompt", 256))
    all_idle = all(e.load.active == 0 for e in cluster.engines)
    if short or all_idle or len(cluster.engines) == 1:
        engine = cluster.least_loaded()
        cluster.note_strategy(request, "data_parallel")
        async for tokens in engine.start_generate(request):
            yield tokens
        return
    async for tokens in balanced_pd(request, cluster):
        yield tokens

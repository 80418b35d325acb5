"""Adaptive: a request runs whole on the least loaded engine (data parallel) unless that engine
is backed up with prefill work; then `balanced_pd` splits it between a prefill and a decode
engine, so the prefill work is shared.

A request runs whole when the part of its prompt the engine has not cached is short
(`--router-arg short_prompt=256` tokens or fewer), when the engine's queued prefill is under
`--router-arg backlog=0.5` times the prompt, or when the job has no prefill and decode engines
to split between. The `strategy` metric of each request says which was chosen.

Designed in the simulator against every fixed router (results/README.md, "adaptive"): there it
beat the best fixed router on `long` at every rate tried and matched it on `chat` and
`shared_prefix`. On real ranks (48 requests per point) it was within 5% of the best fixed
router, or ahead of it, at 4 of 7 points, and behind by 8–14% at the other three.
"""

from .balanced_pd import balanced_pd


def _number(cluster, key: str, default: float) -> float:
    text = cluster.args.get(key, default)
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if value < 0:
        raise ValueError(f"--router-arg {key}={text}: use a number >= 0")
    return value


async def adaptive(request, cluster):
    engine = cluster.least_loaded()
    n = len(request.prompt)
    uncached = n - cluster.cached_prefix(engine, request)
    short = uncached <= _number(cluster, "short_prompt", 256)
    backed_up = engine.load.queued_prefill >= _number(cluster, "backlog", 0.5) * n
    if short or not backed_up or not (cluster.prefill and cluster.decode):
        cluster.note_strategy(request, "data_parallel")
        async for tokens in engine.start_generate(request):
            yield tokens
        return
    async for tokens in balanced_pd(request, cluster):
        yield tokens

"""Adaptive: picks a strategy per request from live load and prompt length.

Work is estimated in prompt tokens still to prefill on each engine (`load.queued_prefill`).
Short prompts, or an idle engine that would finish the whole prompt sooner than a split
would, run data parallel. Otherwise the prompt is split between the least loaded prefill and
decode engines so that both finish their share at the same time (balanced disaggregation
with a split chosen from the queues, not a constant).
`--router-arg short_prompt=256` sets the length under which a prompt is never split.
"""


def balanced_split(n: int, prefill_queue: int, decode_queue: int) -> int:
    """The prompt position up to which the prefill engine computes, equalising finish times."""
    split = (n + decode_queue - prefill_queue) // 2
    return max(0, min(n - 1, split))


async def adaptive(request, cluster):
    n = len(request.prompt)
    everyone = cluster.least_loaded()
    prefill = cluster.least_loaded(cluster.prefill or cluster.engines)
    decode = cluster.least_loaded(cluster.decode or cluster.engines)
    p_queue, d_queue = prefill.load.queued_prefill, decode.load.queued_prefill
    split = balanced_split(n, p_queue, d_queue)
    whole_alone = everyone.load.queued_prefill + n
    split_finish = max(p_queue + split, d_queue + n - split)
    short = n <= int(cluster.args.get("short_prompt", 256))
    if short or prefill is decode or split == 0 or whole_alone <= split_finish:
        cluster.note_strategy(request, "data_parallel")
        async for tokens in everyone.start_generate(request):
            yield tokens
        return
    cluster.note_strategy(request, "balanced_pd")
    kv = await decode.prep_recv(request, end=split)
    if kv.matched < split:
        await prefill.remote_send(request, kv, begin=kv.matched, end=split)
    async for tokens in decode.start_generate(request, begin=split):
        yield tokens

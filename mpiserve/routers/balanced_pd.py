"""Balanced prefill-decode disaggregation: the decode engine also prefills the tail of the
prompt (`--router-arg decode_fraction=0.1`, the share of the prompt it computes itself), so
prefill work is shared instead of piling up on the prefill engines."""


async def balanced_pd(request, cluster):
    prefill = cluster.least_loaded(cluster.prefill or cluster.engines)
    decode = cluster.least_loaded(cluster.decode or cluster.engines)
    if prefill is decode:
        cluster.note_strategy(request, "data_parallel")
        async for tokens in decode.start_generate(request):
            yield tokens
        return
    fraction = float(cluster.args.get("decode_fraction", 0.1))
    n = len(request.prompt)
    split = min(n - 1, int(n * (1 - fraction)))
    cluster.note_strategy(request, "balanced_pd")
    kv = await decode.prep_recv(request, end=split)
    if kv.matched < split:
        await prefill.remote_send(request, kv, begin=kv.matched, end=split)
    async for tokens in decode.start_generate(request, begin=split):
        yield tokens

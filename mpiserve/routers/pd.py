"""Prefill-decode disaggregation: a prefill engine computes the prompt's KV and sends it to a
decode engine, which computes only the last prompt position and generates."""


async def pd(request, cluster):
    prefill = cluster.least_loaded(cluster.prefill or cluster.engines)
    decode = cluster.least_loaded(cluster.decode or cluster.engines)
    if prefill is decode:                        # one engine: nothing to disaggregate
        cluster.note_strategy(request, "data_parallel")
        async for tokens in decode.start_generate(request):
            yield tokens
        return
    cluster.note_strategy(request, "pd")
    kv = await decode.prep_recv(request, end=-1)
    if kv.matched < kv.end:
        await prefill.remote_send(request, kv, begin=kv.matched, end=-1)
    async for tokens in decode.start_generate(request, begin=-1):
        yield tokens

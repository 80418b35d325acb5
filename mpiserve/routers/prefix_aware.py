"""Prefix-aware disaggregation: generate on the decode engine that holds the longest cached
prefix of the prompt; send only the KV it lacks, from the prefill engine that holds the most."""


async def prefix_aware(request, cluster):
    def best(engines):
        return max(engines, key=lambda e: (cluster.cached_prefix(e, request),
                                           -e.load.active, -e.rank))

    decode = best(cluster.decode or cluster.engines)
    prefill = best([e for e in cluster.prefill or cluster.engines if e is not decode] or [decode])
    kv = await decode.prep_recv(request, end=-1)
    begin = kv.end
    if kv.matched >= kv.end:
        cluster.note_strategy(request, "prefix_hit")
    elif prefill is decode:
        cluster.note_strategy(request, "data_parallel")
        begin = kv.matched
    else:
        cluster.note_strategy(request, "pd")
        await prefill.remote_send(request, kv, begin=kv.matched, end=-1)
    async for tokens in decode.start_generate(request, begin=begin):
        yield tokens

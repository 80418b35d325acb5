"""The router's view of an engine's prefill work: a prompt given to an engine counts as held
there from that moment (the engine prefills in arrival order), and a later prompt sharing its
prefix is charged only for the rest (pure bookkeeping, no MPI)."""

import asyncio

from mpiserve.cluster.messages import KVAddress, Request, TokenUpdate, TransferDone
from mpiserve.engine.sampling_params import SamplingParams
from mpiserve.router.cluster import Cluster

PAGE = 16


class HeldStreams:
    """A dispatcher whose token streams stay silent until `finish(request_id)`."""

    def __init__(self):
        self.stats = {}
        self.queues = {}
        self.on_call = lambda method: None

    async def call(self, rank, method, request, **args):
        self.on_call(method)
        if method == "prep_recv":
            end = request.resolve(args["end"], len(request.prompt))
            return KVAddress(rank, request.id, 0, end, tuple(range(end // PAGE + 1)))
        return TransferDone(0, True, 64)

    def stream(self, rank, request, **args):
        self.queues[request.id] = asyncio.Queue()
        return self.queues[request.id]

    def finish(self, request_id):
        self.queues[request_id].put_nowait(TokenUpdate(0, [7], "length", done=True))


def request(name, prompt):
    return Request(name, prompt, SamplingParams(max_tokens=1))


async def consume(generator):
    return [t async for chunk in generator for t in chunk]


def test_a_dispatched_prompt_counts_as_held_and_shared_pages_are_not_charged_twice():
    async def scenario():
        dispatcher = HeldStreams()
        cluster = Cluster(dispatcher, {1: "prefill", 2: "decode"}, PAGE)
        engine, other = cluster.engines
        shared = list(range(100, 148))                       # three whole pages
        first = request("a", shared + [1] * 20)
        second = request("b", shared + [2] * 30)
        assert cluster.cached_prefix(engine, second) == 0

        task_a = asyncio.create_task(consume(engine.start_generate(first)))
        await asyncio.sleep(0)
        assert cluster.cached_prefix(engine, second) == 48   # before a's first token
        assert cluster.cached_prefix(other, second) == 0
        assert engine.load.queued_prefill == 68

        task_b = asyncio.create_task(consume(engine.start_generate(second)))
        await asyncio.sleep(0)
        assert engine.load.queued_prefill == 68 + 30         # b's shared pages are a's

        dispatcher.finish("a")
        dispatcher.finish("b")
        assert await task_a == [7] and await task_b == [7]
        assert engine.load.queued_prefill == 0 and engine.load.active == 0

    asyncio.run(scenario())


def test_the_sender_is_charged_only_for_what_it_lacks():
    async def scenario():
        dispatcher = HeldStreams()
        cluster = Cluster(dispatcher, {1: "prefill", 2: "decode"}, PAGE)
        sender, receiver = cluster.engines
        prompt = list(range(200, 264))
        warm = request("warm", prompt[:32] + [9] * 8)
        task = asyncio.create_task(consume(sender.start_generate(warm)))
        await asyncio.sleep(0)
        assert sender.load.queued_prefill == 40

        kv = await receiver.prep_recv(request("r", prompt), end=64)
        during_send = []
        dispatcher.on_call = lambda method: during_send.append(sender.load.queued_prefill)
        assert (await sender.remote_send(request("r", prompt), kv, end=64)).ok
        assert during_send == [40 + 32]                       # [32, 64): the rest is warm's
        assert sender.load.queued_prefill == 40
        assert cluster.cached_prefix(receiver, request("s", prompt)) == 64
        dispatcher.finish("warm")
        await task

    asyncio.run(scenario())

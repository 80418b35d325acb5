"""A second engine stepping in a process of its own, for `mpiserve profile` to time steps beside
it: on a CPU host, engines share caches and memory bandwidth, and a step takes longer while
another engine steps (results/README.md, the simulator's section, has the figures).

The neighbour serves a mix like a job's other engine: over and over, one long prompt's prefill
and a batch of short requests decoding, each about half of its time.
"""

from __future__ import annotations

import itertools
import multiprocessing
import random
import time
from contextlib import contextmanager

from .profiled_cost import ProfileError

LONG_PROMPT = 512
SHORT_PROMPT = 16
DECODE_BATCH = 7
DECODE_TOKENS = 32
READY_TIMEOUT_S = 600.0           # building the engine, compiling kernels the cache lacks
STOP_TIMEOUT_S = 30.0


@contextmanager
def neighbour_engine(config):
    """Runs an engine of `config` (an EngineConfig) stepping without pause in another process
    until the block ends; an error if it fails to start or dies before it does."""
    context = multiprocessing.get_context("spawn")
    ready, stop = context.Event(), context.Event()
    process = context.Process(target=_serve_load, args=(config, ready, stop), daemon=True,
                              name="mpiserve-profile-neighbour")
    process.start()
    try:
        _wait_ready(process, ready)
        yield
        if not process.is_alive():
            raise ProfileError(f"the neighbour engine exited (code {process.exitcode}) while "
                               "steps were timed beside it")
    finally:
        stop.set()
        process.join(STOP_TIMEOUT_S)
        if process.is_alive():
            process.terminate()
            process.join(STOP_TIMEOUT_S)


def _wait_ready(process, ready) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(1.0):
        if not process.is_alive():
            raise ProfileError(f"the neighbour engine failed to start (exit code "
                               f"{process.exitcode}; its error is above)")
        if time.monotonic() > deadline:
            raise ProfileError(f"the neighbour engine was not ready in {READY_TIMEOUT_S:.0f} s")


def _serve_load(config, ready, stop) -> None:
    from ..engine.engine import Engine
    from ..engine.sampling_params import SamplingParams
    engine = Engine(config)
    rng = random.Random(11)
    vocab = engine.model_config.vocab_size
    one = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    some = SamplingParams(max_tokens=DECODE_TOKENS, temperature=0, ignore_eos=True)
    ready.set()
    for round_ in itertools.count():
        if stop.is_set():
            return
        engine.add_request(f"long{round_}", [rng.randrange(5, vocab) for _ in range(LONG_PROMPT)],
                           one)
        for i in range(DECODE_BATCH):
            engine.add_request(f"short{round_}.{i}",
                               [rng.randrange(5, vocab) for _ in range(SHORT_PROMPT)], some)
        while engine.has_work and not stop.is_set():
            engine.step()

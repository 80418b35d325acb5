"""Serving benchmark workloads: seeded requests of token ids with Poisson arrival times (pure).

Every request asks for greedy generation with eos ignored, so each produces exactly its
`max_tokens`. Lengths are drawn uniformly within `spread` of their mean. Prompts depend only on
the workload and the seed, arrivals on the rate too: every router and every rate sees the same
prompts, and every router at one rate sees the same arrival times.

| workload | prompt | output | arrivals |
|---|---|---|---|
| `long` | ~2000 tokens (±10%) | ~32 (±10%) | Poisson |
| `chat` | ~200 (±50%) | ~128 (±50%) | Poisson |
| `shared_prefix` | one 1500-token system prompt + ~100 own (±10%) | ~32 (±10%) | Poisson |
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

FIRST_TOKEN_ID = 5                  # ids below are the demo tokenizer's special tokens


@dataclass(frozen=True)
class Workload:
    name: str
    prompt_len: int                 # mean tokens of a request's own prompt part
    output_len: int                 # mean max_tokens
    spread: float                   # lengths uniform in mean * [1 - spread, 1 + spread]
    shared_prefix_len: int = 0      # tokens every prompt starts with
    rates: tuple[float, ...] = ()   # default request rates (requests/s)
    num_requests: int = 32          # default number of requests per run
    slo_ttft: float = 10.0          # default SLOs for goodput (seconds)
    slo_tpot: float = 0.25

    def describe(self) -> str:
        shared = (f"a shared {self.shared_prefix_len}-token prefix + "
                  if self.shared_prefix_len else "")
        pct = f"±{self.spread:.0%}"
        return (f"prompts {shared}~{self.prompt_len} tokens ({pct}), outputs ~{self.output_len} "
                f"tokens ({pct}), token-id prompts, greedy, eos ignored, Poisson arrivals")


WORKLOADS = {
    "long": Workload("long", 2000, 32, 0.1, rates=(0.1, 0.2, 0.3), num_requests=32,
                     slo_ttft=15.0, slo_tpot=0.25),
    "chat": Workload("chat", 200, 128, 0.5, rates=(1.0, 2.0, 4.0), num_requests=48,
                     slo_ttft=3.0, slo_tpot=0.25),
    "shared_prefix": Workload("shared_prefix", 100, 32, 0.1, shared_prefix_len=1500,
                              rates=(1.0, 2.0, 4.0), num_requests=48, slo_ttft=5.0,
                              slo_tpot=0.25),
}
# --quick: the same kinds of requests, tiny (for a smoke test on the tiny model)
QUICK_WORKLOADS = {
    "long": replace(WORKLOADS["long"], prompt_len=256, output_len=8, rates=(4.0,),
                    num_requests=6),
    "chat": replace(WORKLOADS["chat"], prompt_len=48, output_len=16, rates=(4.0,),
                    num_requests=6),
    "shared_prefix": replace(WORKLOADS["shared_prefix"], prompt_len=16, output_len=8,
                             shared_prefix_len=192, rates=(4.0,), num_requests=6),
}


@dataclass(frozen=True)
class BenchRequest:
    custom_id: str
    prompt: list[int]
    max_tokens: int
    arrival_s: float


def around(rng: random.Random, mean: int, spread: float) -> int:
    """A length uniform within `spread` of `mean` (at least 1)."""
    low, high = round(mean * (1 - spread)), round(mean * (1 + spread))
    return max(1, rng.randint(low, high))


def poisson_arrivals(count: int, rate: float, rng: random.Random) -> list[float]:
    """Arrival times of a Poisson process of `rate` requests/s, the first at 0, to 1 ms."""
    if rate <= 0:
        raise ValueError(f"request rate {rate} must be positive")
    times, now = [], 0.0
    for i in range(count):
        if i:
            now += rng.expovariate(rate)
        times.append(round(now, 3))
    return times


def make_requests(workload: Workload, rate: float, num_requests: int, seed: int,
                  token_limit: int) -> list[BenchRequest]:
    """The workload's requests at `rate`; token ids in [FIRST_TOKEN_ID, token_limit)."""
    if token_limit <= FIRST_TOKEN_ID:
        raise ValueError(f"token_limit {token_limit} leaves no ordinary token ids")
    prompts = random.Random(f"{seed}/{workload.name}/prompts")
    shared = [prompts.randrange(FIRST_TOKEN_ID, token_limit)
              for _ in range(workload.shared_prefix_len)]
    arrivals = poisson_arrivals(num_requests, rate,
                                random.Random(f"{seed}/{workload.name}/arrivals/{rate!r}"))
    requests = []
    for i, arrival in enumerate(arrivals):
        own = around(prompts, workload.prompt_len, workload.spread)
        prompt = shared + [prompts.randrange(FIRST_TOKEN_ID, token_limit) for _ in range(own)]
        max_tokens = around(prompts, workload.output_len, workload.spread)
        requests.append(BenchRequest(f"{workload.name}-{i:05d}", prompt, max_tokens, arrival))
    return requests


WARMUP_PREFIX = "warmup-"


def with_warmup(requests: list[BenchRequest], count: int, lead_s: float,
                token_limit: int) -> list[BenchRequest]:
    """`count` short warm-up requests arriving at 0 (they take every engine's first-use costs:
    lazy loading, first kernel calls), then `requests` arriving `lead_s` later. The warm-up
    requests' custom_ids start with WARMUP_PREFIX; they are left out of the metrics."""
    rng = random.Random("warmup")
    warm = [BenchRequest(f"{WARMUP_PREFIX}{i}",
                         [rng.randrange(FIRST_TOKEN_ID, token_limit) for _ in range(97)], 4, 0.0)
            for i in range(count)]
    return warm + [replace(r, arrival_s=round(r.arrival_s + lead_s, 3)) for r in requests]


def batch_record(request: BenchRequest) -> dict:
    """The request as one line of mpiserve batch input (OpenAI batch format + arrival_s)."""
    return {"custom_id": request.custom_id, "method": "POST", "url": "/v1/completions",
            "arrival_s": request.arrival_s,
            "body": {"prompt": request.prompt, "max_tokens": request.max_tokens,
                     "temperature": 0, "ignore_eos": True}}

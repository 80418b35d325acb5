"""The requests of a simulated run: a built-in benchmark workload (the same seeded prompts and
Poisson arrivals `mpiserve bench` serves) or an OpenAI batch JSONL file with `arrival_s`, as
`mpiserve run` reads it."""

from __future__ import annotations

from pathlib import Path

from ..batch.input_file import read_batch
from ..bench.workloads import Workload, make_requests
from ..engine.sampling_params import SamplingParams
from ..errors import MpiserveError
from .simulation import SimRequest


def workload_requests(workload: Workload, rate: float, count: int, seed: int,
                      token_limit: int) -> list[SimRequest]:
    """Greedy, eos ignored: every request generates exactly its max_tokens."""
    return [SimRequest(r.custom_id, r.prompt,
                       SamplingParams(max_tokens=r.max_tokens, temperature=0, ignore_eos=True),
                       r.arrival_s)
            for r in make_requests(workload, rate, count, seed, token_limit)]


def file_requests(path: str | Path, tokenizer=None, limits=None) -> list[SimRequest]:
    """A batch file's requests in file order (no `arrival_s`: arrives at 0). Prompts given
    as text or chat messages need `tokenizer` (a Tokenizer) and `limits` (ModelLimits)."""
    requests = []
    for item in read_batch(path):
        if item.error is not None:
            raise MpiserveError(f"{path}: line {item.line_no}: {item.error}")
        requests.append(SimRequest(item.custom_id, _prompt(item, path, tokenizer, limits),
                                   item.params, item.arrival_s or 0.0))
    if not requests:
        raise MpiserveError(f"{path}: no requests")
    return requests


def _prompt(item, path, tokenizer, limits) -> list[int]:
    if isinstance(item.prompt, list):
        return list(item.prompt)
    if tokenizer is None:
        raise MpiserveError(f"{path}: line {item.line_no} gives text; simulate token-id "
                            "prompts, or pass --tokenizer DIR to tokenize it")
    from ..router.request_prompt import PromptProblem, prompt_ids
    try:
        return prompt_ids(item, tokenizer, limits)
    except PromptProblem as problem:
        raise MpiserveError(f"{path}: line {item.line_no}: {problem}") from None


def observed_rate(requests: list[SimRequest]) -> float:
    """Requests per second between the first and the last arrival (0 if all arrive at once)."""
    arrivals = [r.arrival_s for r in requests]
    span = max(arrivals) - min(arrivals)
    return round((len(arrivals) - 1) / span, 3) if span > 0 else 0.0

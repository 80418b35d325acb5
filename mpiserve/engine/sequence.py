"""One request's tokens, pages and progress inside an engine (pure bookkeeping)."""

from __future__ import annotations

import enum
import time
from typing import TYPE_CHECKING

from .sampling_params import SamplingParams

if TYPE_CHECKING:
    from .token_logprobs import TokenLogprob


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Tokens are prompt + output; KV of positions [0, num_computed) is valid in `page_ids`.

    A sequence with `prefill_only` computes the KV of its prompt and samples nothing; the
    microserving `remote_send` call uses it to produce KV for another engine.
    """

    def __init__(self, seq_id, prompt: list[int], params: SamplingParams,
                 prefill_only: bool = False, sample_index: int = 0):
        self.seq_id = seq_id
        self.sample_index = sample_index   # which of the request's n samples this is
        self.forks: list[Sequence] = []    # on sample 0: the request's other samples
        self.prompt = list(prompt)
        self.output: list[int] = []
        self.params = params
        self.prefill_only = prefill_only
        self.status = SequenceStatus.WAITING
        self.page_ids: list[int] = []
        self.page_hashes: list[int] = []   # chained hashes of the full pages registered so far
        self.num_computed = 0
        self.prefix_matched = 0            # prompt tokens found in the prefix cache or received
        self.num_preemptions = 0
        self.fallback = False              # KV expected from another engine was recomputed
        self.finish_reason: str | None = None
        self.logprobs: list[TokenLogprob] = []          # one per output token, when asked
        self.prompt_logprobs: list[TokenLogprob] = []   # prompt tokens 1.. (echo), when asked
        self.arrival_time = time.monotonic()
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def tokens_between(self, start: int, end: int) -> list[int]:
        """`tokens[start:end]` without building the whole list (a decode row needs one)."""
        known = len(self.prompt)
        if start >= known:
            return self.output[start - known:end - known]
        return self.prompt[start:end] + self.output[:max(0, end - known)]

    @property
    def num_uncomputed(self) -> int:
        return self.num_tokens - self.num_computed

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """Whether prompt log probabilities are asked for and not all computed yet: until
        then the prompt is computed here, never taken from the prefix cache."""
        return (self.params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt) - 1)

    @property
    def in_prefill(self) -> bool:
        """True while the step that computes this sequence's next tokens samples nothing."""
        return self.num_computed + 1 < self.num_tokens

    def max_total_tokens(self) -> int:
        """Upper bound of the positions this sequence may ever hold KV for."""
        if self.prefill_only:
            return len(self.prompt)
        return len(self.prompt) + self.params.max_tokens

    def __repr__(self) -> str:
        return (f"Sequence({self.seq_id!r}, prompt={len(self.prompt)}, out={len(self.output)}, "
                f"computed={self.num_computed}, {self.status.value})")


def all_samples_finished(seq: Sequence) -> bool:
    """Whether a request's sample 0 and every sample forked from it have finished."""
    return seq.is_finished and all(fork.is_finished for fork in seq.forks)

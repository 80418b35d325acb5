"""What a cost model needs to know about one engine step: how much of each kind of work its
scheduled chunks hold (pure)."""

from __future__ import annotations

from typing import NamedTuple

from .scheduler import Chunk


class StepShape(NamedTuple):         # a tuple: built once per step (simulated or timed)
    prefill_tokens: int = 0     # positions computed for prompts (chunked prefill included)
    decode_seqs: int = 0        # sequences computing one generated position each
    context_tokens: int = 0     # KV positions the step's attention reads, summed over chunks
    attention_pairs: int = 0    # (query, key) pairs attention computes, summed over chunks
    sampled: int = 0            # rows whose logits the step computes (lm_head)

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_seqs

    @classmethod
    def of(cls, chunks: list[Chunk]) -> StepShape:
        prefill = decode = context = pairs = sampled = 0
        for seq, start, length, samples in chunks:
            if start >= len(seq.prompt):                  # as the engine counts decode tokens
                decode += length
            else:
                prefill += length
            context += start + length
            # query at position p attends to keys [0, p]: sum of (p + 1) over the chunk
            pairs += length * start + length * (length + 1) // 2
            sampled += samples
        return cls(prefill, decode, context, pairs, sampled)

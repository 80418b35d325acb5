"""What a request's settings do to the logits before a token is chosen: repetition,
presence and frequency penalties, logit bias, and the eos mask of `min_tokens`."""

from __future__ import annotations

import torch

from .sequence import Sequence


def shaped_logits(logits: torch.Tensor, seq: Sequence, eos_ids: tuple[int, ...]) -> torch.Tensor:
    """logits: [vocab] float32 of `seq`'s next token; returns a new tensor when anything
    applies (transformers' order: repetition penalty, then the others)."""
    params = seq.params
    if not params.shapes_logits:
        return logits
    logits = logits.clone()
    if params.repetition_penalty != 1.0:
        _repetition_penalty(logits, seq.tokens, params.repetition_penalty)
    if seq.output and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(seq.output), minlength=logits.numel())
        counts = counts[:logits.numel()].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    for token, bias in params.logit_bias:
        if token < logits.numel():
            logits[token] += bias
    if len(seq.output) < params.min_tokens:
        ends = [t for t in (*eos_ids, *params.stop_token_ids) if t < logits.numel()]
        logits[ends] = float("-inf")
    return logits


def _repetition_penalty(logits: torch.Tensor, tokens: list[int], penalty: float) -> None:
    """Every token seen (prompt or output) gets less likely: a positive logit is divided by the
    penalty, a negative one multiplied (transformers' RepetitionPenaltyLogitsProcessor)."""
    seen = torch.tensor(sorted(set(tokens)), dtype=torch.int64)
    values = logits[seen]
    logits[seen] = torch.where(values > 0, values / penalty, values * penalty)

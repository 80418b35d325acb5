"""Log probabilities of chosen tokens and their most likely alternatives (pure torch)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """`token`'s log probability, and the `top` (token id, log probability) alternatives, most
    likely first (as many as the request asked for)."""
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """logits: [vocab] float32, the model's own (before penalties and temperature)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    return TokenLogprob(token, float(logprobs[token]), _top(logprobs, top))


def token_logprobs(logits: torch.Tensor, tokens: list[int], top: int) -> list[TokenLogprob]:
    """One per row: logits [rows, vocab] float32, tokens[i] the token that followed row i."""
    logprobs = torch.log_softmax(logits, dim=-1)
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    return [TokenLogprob(t, lp, _top(row, top)) for t, lp, row in zip(tokens, chosen, logprobs)]


def _top(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if k == 0:
        return ()
    values, ids = torch.topk(logprobs, k)
    return tuple(zip(ids.tolist(), values.tolist()))

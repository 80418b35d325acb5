"""Log probabilities in OpenAI's response shapes (pure formatting).

A token is shown as its own text, special tokens included ("<|im_end|>"); a token that ends
inside a multi-byte character shows U+FFFD, as tokenizers decode it alone. A completion's
`top_logprobs` also holds the chosen token, as OpenAI's legacy completions do; a chat
token's `top_logprobs` are exactly the most likely ones asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.token_logprobs import TokenLogprob

TokenText = Callable[[int], str]        # token id -> its text


def token_text_of(tokenizer) -> TokenText:
    """A token's own text, special tokens included."""
    return lambda token: tokenizer.decode([token], skip_special_tokens=False)


def completion_logprobs(tokens: list[int], entries: list[TokenLogprob | None],
                        token_text: TokenText) -> dict:
    """`/v1/completions` shape for the `tokens` of the returned text (with echo, the prompt's
    first); entries[i] scores tokens[i], None for a token nothing scores (the prompt's first)."""
    texts = [token_text(t) for t in tokens]
    offsets = [0, *accumulate(len(text) for text in texts)][:len(texts)]
    return {"tokens": texts,
            "token_logprobs": [None if e is None else e.logprob for e in entries],
            "top_logprobs": [None if e is None else {token_text(t): lp
                                                     for t, lp in _with_chosen(e)}
                             for e in entries],
            "text_offset": offsets}


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict:
    """`/v1/chat/completions` shape: one content item per generated token."""
    return {"content": [dict(_chat_token(entry.token, entry.logprob, token_text),
                             top_logprobs=[_chat_token(t, lp, token_text)
                                           for t, lp in entry.top])
                        for entry in entries],
            "refusal": None}


def _chat_token(token: int, logprob: float, token_text: TokenText) -> dict:
    text = token_text(token)
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}


def _with_chosen(entry: TokenLogprob) -> list[tuple[int, float]]:
    top = list(entry.top)
    if all(t != entry.token for t, _ in top):
        top.append((entry.token, entry.logprob))
    return top

"""A request's prompt as token ids, and whether the model can take it (before any engine
sees it): one check for batch lines and online requests."""

from __future__ import annotations

from dataclasses import dataclass

from ..batch.input_file import BatchItem
from ..model.tokenizer import Tokenizer


@dataclass(frozen=True)
class ModelLimits:
    name: str
    vocab_size: int
    max_model_len: int


class PromptProblem(Exception):
    """The request cannot run; the message says why (without the line or request)."""


def prompt_ids(item: BatchItem, tokenizer: Tokenizer, limits: ModelLimits) -> list[int]:
    """The prompt's token ids (a chat rendered with the checkpoint's template); raises
    PromptProblem for a prompt the model cannot take or a template that fails."""
    try:
        prompt = _tokens(item, tokenizer)
    except Exception as exc:          # a template or tokenizer failure on this request
        raise PromptProblem(f"{type(exc).__name__}: {exc}") from exc
    if not prompt:
        raise PromptProblem("the prompt is empty after tokenization")
    if len(prompt) >= limits.max_model_len:
        raise PromptProblem(f"prompt of {len(prompt)} tokens leaves no room to generate in the "
                            f"context of {limits.max_model_len} tokens")
    bad = next((t for t in prompt if t >= limits.vocab_size), None)
    if bad is not None:
        raise PromptProblem(f"token id {bad} is outside the vocabulary of {limits.vocab_size}")
    return prompt


def _tokens(item: BatchItem, tokenizer: Tokenizer) -> list[int]:
    if item.kind == "chat":
        text = tokenizer.apply_chat_template(item.messages)
        return tokenizer.encode(text, add_special_tokens=False)
    if isinstance(item.prompt, str):
        return tokenizer.encode(item.prompt)
    return list(item.prompt)

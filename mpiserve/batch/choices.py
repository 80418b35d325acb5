"""The choices of a completion record: each sample's text, finish reason and log probabilities
in OpenAI's shapes, with the prompt in front for an echo (pure formatting)."""

from __future__ import annotations

from dataclasses import dataclass

from ..engine.stopping import visible_text
from ..model.tokenizer import Tokenizer
from .input_file import BatchItem
from .openai_logprobs import chat_logprobs, completion_logprobs, token_text_of


@dataclass(frozen=True)
class Choice:
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: dict | None = None


def choices(item: BatchItem, prompt: list[int], samples: list, prompt_logprobs: list | None,
            tokenizer: Tokenizer) -> list[Choice]:
    """One choice per sample, in order. A sample has `tokens`, `logprobs` (None, or one
    TokenLogprob per token) and `finish_reason` (router.request_trace.SampleTrace);
    `prompt_logprobs` scores prompt tokens 1.. (an echo with logprobs)."""
    token_text = token_text_of(tokenizer)
    made = []
    for sample in samples:
        tokens, logprobs = sample.tokens, sample.logprobs
        if item.echo_only:
            tokens, logprobs, reason = [], [] if logprobs is not None else None, "length"
        else:
            reason = sample.finish_reason
        text = visible_text(tokenizer.decode(tokens), item.params.stop)
        if item.kind == "chat":
            rendered = None if logprobs is None else chat_logprobs(logprobs, token_text)
        else:
            if item.echo:
                text = _prompt_text(item, prompt, tokenizer) + text
            rendered = None if logprobs is None else completion_logprobs(
                *_scored(item, prompt, tokens, logprobs, prompt_logprobs), token_text)
        made.append(Choice(tokens, text, reason, rendered))
    return made


def _prompt_text(item: BatchItem, prompt: list[int], tokenizer: Tokenizer) -> str:
    return item.prompt if isinstance(item.prompt, str) else tokenizer.decode(prompt)


def _scored(item: BatchItem, prompt: list[int], tokens: list[int], logprobs: list,
            prompt_logprobs: list | None) -> tuple[list[int], list]:
    """The tokens a completion's logprobs cover, and their entries: with an echo, the prompt's
    first (scored by nothing), its others, then the completion's."""
    if not item.echo:
        return tokens, logprobs
    return prompt + tokens, [None, *(prompt_logprobs or []), *logprobs]

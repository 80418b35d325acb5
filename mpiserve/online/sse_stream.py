"""A streamed answer as server-sent events, in OpenAI's chunk shapes: each chunk carries what
the samples added since the last (text, token ids, log probabilities), a sample's last chunk
its finish reason, then an optional usage chunk and `data: [DONE]`."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from ..batch.openai_logprobs import chat_logprobs, completion_logprobs, token_text_of
from .online_runner import Ended, OnlineRequest, OnlineRunner
from .text_stream import TextStream


def sse(payload) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class _SampleCursor:
    """What one sample's client has been sent."""

    def __init__(self, text: TextStream):
        self.text, self.tokens, self.ended, self.greeted = text, 0, False, False


async def sse_events(runner: OnlineRunner, online: OnlineRequest,
                     include_usage: bool) -> AsyncIterator[str]:
    """The events of one streamed request (http_app aborts it if they stop early)."""
    chat = online.item.kind == "chat"
    header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{online.request.id}",
              "object": "chat.completion.chunk" if chat else "text_completion",
              "created": int(time.time()), "model": runner.limits.name}
    stops = online.request.params.stop
    cursors = [_SampleCursor(TextStream(runner.tokenizer.decode, stops))
               for _ in range(online.request.params.n)]
    token_text = token_text_of(runner.tokenizer)
    while True:
        event = await online.queue.get()
        if isinstance(event, Ended) and event.error is not None:
            yield sse(event.error.body())
            return
        deltas = [d for i, (cursor, sample) in enumerate(zip(cursors, online.samples()))
                  if (d := _delta(i, cursor, sample, chat, token_text)) is not None]
        if deltas:
            yield sse({**header, "choices": deltas})
        if isinstance(event, Ended):
            if include_usage:
                yield sse({**header, "choices": [], "usage": _usage(online)})
            yield sse("[DONE]")
            return


def _delta(index: int, cursor: _SampleCursor, sample, chat: bool, token_text) -> dict | None:
    new = sample.tokens[cursor.tokens:]
    finished = sample.finish_reason is not None
    if cursor.ended or not (new or finished):
        return None
    piece = cursor.text.advance(sample.tokens, finished)
    logprobs = None
    if sample.logprobs is not None:
        entries = sample.logprobs[cursor.tokens:cursor.tokens + len(new)]
        logprobs = (chat_logprobs(entries, token_text) if chat
                    else completion_logprobs(new, entries, token_text))
    cursor.tokens, cursor.ended = len(sample.tokens), finished
    reason = sample.finish_reason if finished else None
    if not chat:
        return {"index": index, "text": piece, "logprobs": logprobs, "finish_reason": reason,
                "token_ids": new}
    delta = {"content": piece} if cursor.greeted else {"role": "assistant", "content": piece}
    cursor.greeted = True
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason,
            "token_ids": new}


def _usage(online: OnlineRequest) -> dict:
    prompt = len(online.request.prompt)
    generated = sum(len(sample.tokens) for sample in online.samples())
    return {"prompt_tokens": prompt, "completion_tokens": generated,
            "total_tokens": prompt + generated}

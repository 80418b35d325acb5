"""Requests read from an OpenAI Batch API input file (JSONL), one item per line.

Each non-blank line becomes exactly one `BatchItem`: a request ready to run, or an error
whose message names the file, the line and the field at fault. Blank lines are skipped but
still counted, so line numbers match what an editor shows.

A line looks like::

    {"custom_id": "r1", "method": "POST", "url": "/v1/completions",
     "body": {"prompt": "Hello", "max_tokens": 32}}

The body follows OpenAI: `prompt` (a string or a list of token ids) for
`/v1/completions`, `messages` (roles system, user, assistant; content a string or a list
of text parts) for `/v1/chat/completions`, and the sampling fields `max_tokens`,
`temperature`, `top_p`, `seed`, `stop`, `n`, `presence_penalty`, `frequency_penalty`,
`logit_bias`, plus the extensions `top_k`, `ignore_eos`, `repetition_penalty`, `min_tokens`
and `stop_token_ids`. Scoring: a completion's `logprobs` (alternatives per token, 0-20) and
`echo` (the prompt comes back before the completion, scored too when `logprobs` is given;
`max_tokens` 0 then returns the prompt alone); a chat's `logprobs` (true/false) and
`top_logprobs` (0-20). Chat bodies may give `max_completion_tokens` instead of `max_tokens`.
A field set to null takes its default. `max_tokens` defaults to 16 for completions (as
OpenAI) and to 256 for chat (OpenAI's "until the context is full" is rarely what a batch job
wants); temperature defaults to 1.0. OpenAI fields that mpiserve does not implement
(`suffix`, `tools`, `response_format`, `stream`, `best_of` other than n) are refused by name
unless they hold their default; other body fields (`model`, `user`, ...) are ignored.

A line may also carry the top-level extension `arrival_s`: the request arrives that many
seconds (a number >= 0) after the job's clock starts (when every engine has loaded), and is
admitted no earlier (lines are admitted in file order, so give arrival times in increasing
order). Without it a request arrives as soon as it is read.
"""

from __future__ import annotations

import codecs
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from ..engine.sampling_params import MAX_LOGPROBS, SamplingParams
from ..errors import InvalidRequestError, MpiserveError

URL_KINDS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}
DEFAULT_MAX_TOKENS = {"completion": 16, "chat": 256}
CHAT_ROLES = ("system", "user", "assistant")


class BatchInputError(MpiserveError):
    """The batch input file itself cannot be read."""


class _LineError(Exception):
    """One line is not a usable request; the message names the field at fault."""


@dataclass(frozen=True)
class BatchItem:
    """One input line: a request (`error` is None) or the reason it cannot run.

    `kind` is "completion" or "chat" (None if the url was not reached or is wrong);
    `custom_id` is None when it is missing or not a string, or when the line is not JSON.
    `duplicate_of` is the earlier line whose custom_id this line repeats (an error).
    """

    line_no: int
    custom_id: str | None = None
    kind: str | None = None
    prompt: str | list[int] | None = None
    messages: list[dict] | None = None
    params: SamplingParams | None = None
    arrival_s: float | None = None
    echo: bool = False                 # a completion returns its prompt before its text
    echo_only: bool = False            # ... and nothing else (max_tokens 0)
    error: str | None = None
    duplicate_of: int | None = None

    @property
    def error_code(self) -> str:
        """The code of this line's error record: a repeated id is told apart, since its
        record carries an id that another line's record answers for."""
        return "duplicate_custom_id" if self.duplicate_of is not None else "invalid_request"


def read_batch(path: str | Path) -> Iterator[BatchItem]:
    """Yield one `BatchItem` per non-blank line of `path`, in file order."""
    try:
        file = open(path, "rb")
    except OSError as err:
        raise BatchInputError(f"cannot read batch input {path}: {err.strerror}") from err
    return _items(file, str(path))


def count_records(path: str | Path) -> int:
    """How many records (non-blank lines) `path` holds, for progress and ETA."""
    with open(path, "rb") as file:
        return sum(1 for raw in file if raw.strip())


def _items(file: IO[bytes], source: str) -> Iterator[BatchItem]:
    seen: dict[str, int] = {}
    with file:
        for line_no, raw in enumerate(file, 1):
            if line_no == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():
                yield _item(raw, line_no, source, seen)


def _item(raw: bytes, line_no: int, source: str, seen: dict[str, int]) -> BatchItem:
    fields: dict = {"line_no": line_no}
    try:
        request = _decode(raw.removeprefix(codecs.BOM_UTF8))
        fields["custom_id"] = _custom_id(request)
        _claim_id(fields, seen)
        if raw.startswith(codecs.BOM_UTF8):      # _items strips line 1's
            raise _LineError(
                "starts with a byte order mark; a byte order mark is allowed only on line 1")
        fields["arrival_s"] = _arrival(request)
        fields["kind"] = _kind(request)
        fields.update(_body(request, fields["kind"]))
    except _LineError as err:
        fields["error"] = f"{source} line {line_no}: {err}"
    return BatchItem(**fields)


def _decode(raw: bytes) -> dict:
    try:
        text = raw.decode("utf-8").rstrip("\r\n")
    except UnicodeDecodeError as err:
        raise _LineError(
            f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at offset {err.start})") from None
    try:
        request = json.loads(text)
    except json.JSONDecodeError as err:
        raise _LineError(f"invalid JSON: {err.msg} at column {err.colno}") from None
    except (ValueError, RecursionError) as err:  # too long a number, too deep a nesting
        raise _LineError(f"invalid JSON: {err}") from None
    if not isinstance(request, dict):
        raise _LineError(f"must be a JSON object (got {_show(request)})")
    return request


def _custom_id(request: dict) -> str:
    custom_id = _required(request, "custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _LineError(f"custom_id must be a non-empty string (got {_show(custom_id)})")
    return custom_id


def _claim_id(fields: dict, seen: dict[str, int]) -> None:
    """Take the line's custom_id for it, or mark the line a duplicate of the one that has it."""
    custom_id = fields["custom_id"]
    if custom_id in seen:
        fields["duplicate_of"] = seen[custom_id]
        raise _LineError(f"custom_id {_show(custom_id)} duplicates line {seen[custom_id]}")
    seen[custom_id] = fields["line_no"]


def _kind(request: dict) -> str:
    method = _required(request, "method")
    if method != "POST":
        raise _LineError(f'method must be "POST" (got {_show(method)})')
    url = _required(request, "url")
    if not isinstance(url, str) or url not in URL_KINDS:
        raise _LineError(f"url must be one of {', '.join(URL_KINDS)} (got {_show(url)})")
    return URL_KINDS[url]


def _arrival(request: dict) -> float | None:
    arrival = request.get("arrival_s")
    if arrival is None:
        return None
    if not (_is_number(arrival) and arrival >= 0):
        raise _LineError(f"arrival_s must be a number >= 0, the seconds after the job starts "
                         f"when the request arrives (got {_show(arrival)})")
    return float(arrival)


def body_item(body, kind: str, request_id: str) -> BatchItem:
    """An online request's body (`kind` "completion" or "chat") as an item, its `error` set
    when it is not a usable request. `stream` is the caller's to handle."""
    try:
        fields = _body({"body": body}, kind, online=True)
    except _LineError as err:
        return BatchItem(line_no=0, custom_id=request_id, kind=kind, error=str(err))
    return BatchItem(line_no=0, custom_id=request_id, kind=kind, **fields)


def _body(request: dict, kind: str, online: bool = False) -> dict:
    body = _required(request, "body")
    if not isinstance(body, dict):
        raise _LineError(f"body must be a JSON object (got {_show(body)})")
    _refuse_unimplemented(body, online)
    if kind == "chat":
        fields, scoring = {"messages": _messages(body)}, _chat_scoring(body)
    else:
        fields = {"prompt": _prompt(body), "echo": _flag(body, "echo")}
        scoring = _completion_scoring(body, fields["echo"])
    fields["echo_only"] = fields.get("echo", False) and body.get("max_tokens") == 0
    fields["params"] = _params(body, kind, scoring, fields["echo_only"])
    return fields


def _chat_scoring(body: dict) -> dict:
    """SamplingParams fields of a chat's `logprobs` (true/false) and `top_logprobs`."""
    if body.get("echo") not in (None, False):
        raise _LineError("body.echo is for /v1/completions; a chat completion returns only "
                         "the new message")
    wanted = _flag(body, "logprobs")
    top = _count(body, "top_logprobs", MAX_LOGPROBS)
    if top is not None and not wanted:
        raise _LineError("body.top_logprobs needs body.logprobs set to true")
    return {"logprobs": (top or 0) if wanted else None}


def _completion_scoring(body: dict, echo: bool) -> dict:
    """SamplingParams fields of a completion's `logprobs` (alternatives per token) and
    `echo` (the prompt is scored too when both are given)."""
    logprobs = _count(body, "logprobs", MAX_LOGPROBS)
    return {"logprobs": logprobs, "prompt_logprobs": logprobs if echo else None}


def _flag(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise _LineError(f"body.{name} must be true or false (got {_show(value)})")
    return bool(value)


def _count(body: dict, name: str, most: int) -> int | None:
    value = body.get(name)
    if value is not None and not (_is_int(value) and 0 <= value <= most):
        raise _LineError(f"body.{name} must be an integer in [0, {most}] (got {_show(value)})")
    return value


def _prompt(body: dict) -> str | list[int]:
    prompt = _required(body, "prompt", "body.")
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt:
        for index, token in enumerate(prompt):
            if not (_is_int(token) and token >= 0):
                raise _LineError(f"body.prompt[{index}] must be a token id, an integer >= 0 "
                                 f"(got {_show(token)})")
        return prompt
    raise _LineError(
        f"body.prompt must be a non-empty string or list of token ids (got {_show(prompt)})")


def _messages(body: dict) -> list[dict]:
    messages = _required(body, "messages", "body.")
    if not isinstance(messages, list) or not messages:
        raise _LineError(f"body.messages must be a non-empty array (got {_show(messages)})")
    return [_message(message, f"body.messages[{i}]") for i, message in enumerate(messages)]


def _message(message, where: str) -> dict:
    if not isinstance(message, dict):
        raise _LineError(f"{where} must be an object (got {_show(message)})")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise _LineError(f"{where}.role must be one of {', '.join(CHAT_ROLES)} (got {_show(role)})")
    return {"role": role, "content": _content(message.get("content"), f"{where}.content")}


def _content(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(_is_text_part(part) for part in content):
        return "\n".join(part["text"] for part in content)
    raise _LineError(
        f'{where} must be a string or a list of {{"type": "text", "text": ...}} parts '
        f"(got {_show(content)})")


def _is_text_part(part) -> bool:
    return (isinstance(part, dict) and part.get("type") == "text"
            and isinstance(part.get("text"), str))


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_stop(value) -> bool:
    return isinstance(value, str) or (
        isinstance(value, list) and all(isinstance(s, str) for s in value))


def _is_bias(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and k.isdecimal() and _is_number(v) for k, v in value.items())


# SamplingParams field: (what the body must hold, check)
_SAMPLING_FIELDS = {
    "max_tokens": ("an integer", _is_int),
    "temperature": ("a finite number", _is_number),
    "top_p": ("a finite number", _is_number),
    "top_k": ("an integer", _is_int),
    "seed": ("an integer", _is_int),
    "stop": ("a string or a list of strings", _is_stop),
    "ignore_eos": ("true or false", lambda value: isinstance(value, bool)),
    "n": ("an integer", _is_int),
    "presence_penalty": ("a finite number", _is_number),
    "frequency_penalty": ("a finite number", _is_number),
    "repetition_penalty": ("a finite number", _is_number),
    "min_tokens": ("an integer", _is_int),
    "logit_bias": ('an object of token ids to numbers, e.g. {"50256": -100}', _is_bias),
    "stop_token_ids": ("a list of token ids",
                       lambda value: isinstance(value, list) and all(map(_is_int, value))),
}


def _is_off(*defaults):
    """A check that a value is absent or one of `defaults` (False is not 0 here)."""
    return lambda value: value is None or any(
        value is default if isinstance(default, bool) else
        (value == default and not isinstance(value, bool)) for default in defaults)


# OpenAI fields that change the answer and that the engine does not implement: a request
# asking for anything but their default is refused by name, never answered as if it had not
_UNIMPLEMENTED_FIELDS = {
    "suffix": _is_off(""), "tools": _is_off([]), "response_format": _is_off({"type": "text"}),
    "stream": _is_off(False),
}


def _refuse_unimplemented(body: dict, online: bool) -> None:
    fields = {**_UNIMPLEMENTED_FIELDS, "best_of": _is_off(1, body.get("n") or 1)}
    if online:
        del fields["stream"]
    for name, is_off in fields.items():
        if not is_off(body.get(name)):
            raise _LineError(f"body.{name} is not supported by mpiserve "
                             f"(got {_show(body[name])}); leave it out or give its default"
                             + (" (or n)" if name == "best_of" else ""))


def _params(body: dict, kind: str, scoring: dict, echo_only: bool) -> SamplingParams:
    """With `echo_only` (max_tokens 0 and echo), the engine samples one token, which the
    record leaves out: the prompt's last logits come with its prefill anyway."""
    keys = {name: name for name in _SAMPLING_FIELDS}
    if kind == "chat" and body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") is not None:
            raise _LineError("give body.max_tokens or body.max_completion_tokens, not both")
        keys["max_tokens"] = "max_completion_tokens"
    values = {"max_tokens": DEFAULT_MAX_TOKENS[kind], **scoring}
    for name, (expected, ok) in _SAMPLING_FIELDS.items():
        value = body.get(keys[name])
        if value is None:
            continue
        if not ok(value):
            raise _LineError(f"body.{keys[name]} must be {expected} (got {_show(value)})")
        values[name] = value
    if echo_only:
        values["max_tokens"] = 1
    if "logit_bias" in values:
        values["logit_bias"] = {int(token): bias for token, bias in values["logit_bias"].items()}
    try:
        return SamplingParams(**values)
    except InvalidRequestError as err:
        message = re.sub(r"^SamplingParams\.(\w+)",
                         lambda m: f"body.{keys.get(m[1], m[1])}", str(err))
        raise _LineError(message) from None


def _required(obj: dict, key: str, prefix: str = ""):
    value = obj.get(key)
    if value is None:
        raise _LineError(f"{prefix}{key} is missing")
    return value


def _show(value) -> str:
    """A short JSON rendering of a value for an error message."""
    if isinstance(value, (dict, list)) and value:
        return "an object" if isinstance(value, dict) else "an array"
    if isinstance(value, str) and len(value) > 40:
        return json.dumps(value[:37] + "...")
    return json.dumps(value)

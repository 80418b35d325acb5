"""A checkpoint's tokenizer: tokenizer.json through the `tokenizers` library, special tokens from
tokenizer_config.json (falling back to generation_config.json and config.json), and the chat
template rendered in a Jinja sandbox the way transformers renders it."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import processors

from ..errors import CheckpointError, InvalidRequestError


class Tokenizer:
    def __init__(self, backend: BackendTokenizer, model_dir: Path, *, bos_token: str | None,
                 eos_token: str | None, bos_token_id: int | None,
                 eos_token_ids: tuple[int, ...], chat_templates: dict[str, str]):
        self.backend = backend
        self.model_dir = model_dir
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id, self.eos_token_ids = bos_token_id, eos_token_ids
        self.chat_templates = chat_templates

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> Tokenizer:
        """The tokenizer of a checkpoint directory, or of a .gguf file's metadata."""
        model_dir = Path(model_dir)
        if model_dir.suffix == ".gguf":
            from .gguf_tokenizer import gguf_tokenizer
            return gguf_tokenizer(model_dir)
        backend = _load_backend(model_dir / "tokenizer.json")
        source = model_dir / "tokenizer_config.json"
        settings = {**_read_json(model_dir / "special_tokens_map.json"), **_read_json(source)}
        bos = _token_text(settings, "bos_token", source)
        eos = _token_text(settings, "eos_token", source)
        bos_id, eos_id = _token_id(backend, bos, source), _token_id(backend, eos, source)
        if "add_bos_token" in settings or "add_eos_token" in settings:
            _set_post_processor(backend, _added(settings, "add_bos_token", bos, bos_id),
                                _added(settings, "add_eos_token", eos, eos_id))
        generation = _read_json(model_dir / "generation_config.json")
        model = _read_json(model_dir / "config.json")
        eos_ids = _unique([eos_id, *_ids(generation.get("eos_token_id"))])
        return cls(backend, model_dir, bos_token=bos, eos_token=eos,
                   bos_token_id=_first_int(bos_id, generation.get("bos_token_id"),
                                           model.get("bos_token_id")),
                   eos_token_ids=eos_ids or _unique(_ids(model.get("eos_token_id"))),
                   chat_templates=_chat_templates(model_dir, settings, source))

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The conversation as prompt text. Templates usually start with the bos token, so encode
        the result with add_special_tokens=False, as transformers does."""
        template = self.chat_templates.get("default")
        if template is None:
            named = ", ".join(self.chat_templates) or "none"
            raise CheckpointError(f"{self.model_dir}: the tokenizer has no default chat template "
                                  f"(tokenizer_config.json 'chat_template' or chat_template.jinja; "
                                  f"named templates: {named})")
        specials = {name: value for name, value in
                    (("bos_token", self.bos_token), ("eos_token", self.eos_token)) if value}
        try:
            compiled = _compile(template)
        except jinja2.TemplateSyntaxError as exc:
            raise CheckpointError(f"{self.model_dir}: chat template does not compile "
                                  f"({exc})") from None
        try:
            return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                   tools=None, documents=None, **specials)
        except jinja2.TemplateError as exc:
            raise InvalidRequestError(f"chat template of {self.model_dir}: {exc}") from None


def _load_backend(path: Path) -> BackendTokenizer:
    if not path.is_file():
        raise CheckpointError(f"{path}: no tokenizer.json in the model directory")
    try:
        return BackendTokenizer.from_file(str(path))
    except Exception as exc:     # the tokenizers library raises plain Exception
        raise CheckpointError(f"{path}: not a valid tokenizer file ({exc})") from None


def _read_json(path: Path) -> dict:
    """The JSON object in `path`, or {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    return raw


def _token_text(settings: dict, field: str, source: Path) -> str | None:
    """A special token given as a string or as an AddedToken dict {"content": ...}."""
    value = settings.get(field)
    if isinstance(value, dict):
        value = value.get("content")
    if value is not None and not isinstance(value, str):
        raise CheckpointError(f"{source}: field {field!r} should be a token string, got {value!r}")
    return value


def _token_id(backend: BackendTokenizer, token: str | None, source: Path) -> int | None:
    if token is None:
        return None
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise CheckpointError(f"{source}: special token {token!r} is not in tokenizer.json")
    return token_id


def _added(settings: dict, flag: str, token: str | None, token_id: int | None
           ) -> list[tuple[str, int]]:
    return [(token, token_id)] if settings.get(flag) and token is not None else []


def _set_post_processor(backend: BackendTokenizer, prefix: list[tuple[str, int]],
                        suffix: list[tuple[str, int]]) -> None:
    """An explicit add_bos_token / add_eos_token in tokenizer_config.json replaces tokenizer.json's
    post-processor, as transformers 4 did for Llama tokenizers (transformers 5 ignores them)."""
    pieces = [f"{token}:0" for token, _ in prefix] + ["$A:0"] + [f"{t}:0" for t, _ in suffix]
    backend.post_processor = processors.TemplateProcessing(single=" ".join(pieces),
                                                           special_tokens=prefix + suffix)


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, list) else [int(value)]


def _unique(ids) -> tuple[int, ...]:
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _first_int(*values) -> int | None:
    return next((int(v) for v in values if v is not None), None)


def _chat_templates(model_dir: Path, settings: dict, source: Path) -> dict[str, str]:
    """Name -> template; chat_template.jinja, when present, is the default one."""
    value = settings.get("chat_template")
    try:
        if isinstance(value, list):
            templates = {item["name"]: item["template"] for item in value}
        else:
            templates = {"default": value} if isinstance(value, str) else {}
    except (TypeError, KeyError):
        raise CheckpointError(f"{source}: field 'chat_template' should be a string or a list "
                              "of {\"name\", \"template\"} objects") from None
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        templates["default"] = jinja_file.read_text()
    return templates


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    return _sandbox().from_string(template)


@lru_cache(maxsize=1)
def _sandbox() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    return env


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)

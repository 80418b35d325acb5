"""A tokenizer rebuilt from a GGUF file's metadata: byte-level BPE ("gpt2" vocabularies) with the
pre-tokenizer that `tokenizer.ggml.pre` names, special tokens from the token types, and the chat
template stored in the file."""

from __future__ import annotations

from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.models import BPE

from ..errors import CheckpointError
from .gguf_checkpoint import open_gguf
from .tokenizer import Tokenizer

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")


def _split_then_bytes(pattern: str) -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


# tokenizer.ggml.pre -> (pre-tokenizer, whether BPE takes whole in-vocabulary words first)
_PRE_TOKENIZERS = {
    "default": (_gpt2, False), "gpt2": (_gpt2, False),
    "smollm": (_digits_then_gpt2, False), "starcoder": (_digits_then_gpt2, False),
    "llama-bpe": (lambda: _split_then_bytes(_LLAMA3_SPLIT), True),
    "qwen2": (lambda: _split_then_bytes(_QWEN2_SPLIT), False),
}


def gguf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer stored in the metadata of the GGUF file at `path`."""
    path = Path(path)
    meta = _Metadata(open_gguf(path), path)
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"{path}: tokenizer model {model!r} is not supported (only "
                              "byte-level BPE 'gpt2' vocabularies; SentencePiece 'llama' is not)")
    tokens, types = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.token_type", [])
    backend = _backend(path, meta, tokens)
    _add_special_tokens(backend, tokens, types)
    bos_id = meta.get("tokenizer.ggml.bos_token_id", None)
    eos_id = meta.get("tokenizer.ggml.eos_token_id", None)
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos_id]}:0 $A:0", special_tokens=[(tokens[bos_id], bos_id)])
    eos_ids = [i for i in (eos_id, meta.get("tokenizer.ggml.eot_token_id", None))
               if i is not None]
    template = meta.get("tokenizer.chat_template", None)
    return Tokenizer(backend, path, bos_token=_text(tokens, bos_id),
                     eos_token=_text(tokens, eos_id), bos_token_id=bos_id,
                     eos_token_ids=tuple(dict.fromkeys(eos_ids)),
                     chat_templates={"default": template} if template else {})


def _backend(path: Path, meta: _Metadata, tokens: list[str]) -> BackendTokenizer:
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise CheckpointError(f"{path}: pre-tokenizer {pre!r} is not supported "
                              f"(supported: {', '.join(_PRE_TOKENIZERS)})")
    make_pre, ignore_merges = _PRE_TOKENIZERS[pre]
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = BackendTokenizer(BPE(vocab, merges, ignore_merges=ignore_merges))
    backend.pre_tokenizer = make_pre()
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_special_tokens(backend: BackendTokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens become special added tokens, user-defined ones plain added tokens, so the
    pre-tokenizer never splits them."""
    picked = [(index, kind) for index, kind in enumerate(types)
              if kind in (_CONTROL, _USER_DEFINED)]
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, kind in picked if kind == _CONTROL])
    backend.add_tokens([AddedToken(tokens[i], normalized=False)
                        for i, kind in picked if kind == _USER_DEFINED])


def _text(tokens: list[str], index: int | None) -> str | None:
    return None if index is None else tokens[index]


class _Metadata:
    def __init__(self, reader, path: Path):
        self.reader, self.path = reader, path

    def get(self, key: str, *default):
        field = self.reader.get_field(key)
        if field is None:
            if default:
                return default[0]
            raise CheckpointError(f"{self.path}: GGUF metadata lacks {key}")
        value = field.contents()
        return value.item() if hasattr(value, "item") else value

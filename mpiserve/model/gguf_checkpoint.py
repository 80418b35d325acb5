"""GGUF checkpoints (llama.cpp's single-file format): metadata mapped to a ModelConfig and
tensors dequantized at load to Hugging Face names, with llama.cpp's q/k row permutation for
Llama-family rotary undone."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError
from .model_config import ModelConfig

ARCH_MODEL_TYPES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
_HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_PERMUTED_ARCHS = ("llama", "mistral")
_LAYER_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
                "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
              "output": "lm_head"}


def load_gguf_checkpoint(path: str | Path, dtype: torch.dtype | None = None
                         ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and weights (Hugging Face names, dequantized to `dtype`) of a .gguf file."""
    path = Path(path)
    reader = open_gguf(path)
    config = ModelConfig.from_dict(gguf_config_dict(reader), source=str(path))
    weights = {}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        value = torch.from_numpy(np.ascontiguousarray(_dequantize(tensor, path)))
        if config.model_type in _PERMUTED_ARCHS and name.endswith(("q_proj.weight",
                                                                   "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            value = unpermute_rotary_rows(value, heads)
        weights[name] = value.to(dtype or getattr(torch, config.torch_dtype))
    if config.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return config, weights


def gguf_model_config(path: str | Path) -> ModelConfig:
    """The model config in a .gguf file's metadata (no tensor is read)."""
    return ModelConfig.from_dict(gguf_config_dict(open_gguf(Path(path))), source=str(path))


def open_gguf(path: Path):
    """A gguf.GGUFReader on `path` (memory-mapped), or a CheckpointError naming the file. The
    reader parses all metadata up front (seconds for a 50k-token vocabulary), so one parse per
    file version is shared by the config, the tokenizer and the weights."""
    if not path.is_file():
        raise CheckpointError(f"{path}: GGUF file does not exist")
    stat = path.stat()
    return _cached_reader(path.resolve(), stat.st_mtime_ns, stat.st_size)


@lru_cache(maxsize=2)
def _cached_reader(path: Path, mtime_ns: int, size: int):
    import gguf
    try:
        return gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable GGUF file ({exc})") from None


def _dequantize(tensor, path: Path) -> np.ndarray:
    import gguf
    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as err:
        raise CheckpointError(f"{path}: tensor {tensor.name} has type "
                              f"{tensor.tensor_type.name}, which cannot be dequantized") from err
    return values.astype(np.float32).reshape(shape)


def hf_tensor_name(gguf_name: str) -> str | None:
    """Hugging Face name of a GGUF tensor name (None for tensors the model does not use)."""
    stem, _, kind = gguf_name.rpartition(".")
    if stem in _TOP_NAMES:
        return f"{_TOP_NAMES[stem]}.{kind}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{kind}"
    return None


def unpermute_rotary_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Undo llama.cpp's per-head interleave of q/k rows (halves -> pairs) back to HF order."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .transpose(1, 2).reshape(weight.shape))


def gguf_config_dict(reader) -> dict:
    """config.json-style fields from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    if arch not in ARCH_MODEL_TYPES:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported "
                              f"(supported: {', '.join(ARCH_MODEL_TYPES)})")
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    names = {t.name for t in reader.tensors}
    raw = {"model_type": ARCH_MODEL_TYPES[arch], "architectures": [_HF_CLASSES[arch]],
           "hidden_size": hidden,
           "intermediate_size": _field(reader, f"{arch}.feed_forward_length"),
           "num_hidden_layers": _field(reader, f"{arch}.block_count"),
           "num_attention_heads": heads,
           "num_key_value_heads": _field(reader, f"{arch}.attention.head_count_kv", heads),
           "head_dim": _field(reader, f"{arch}.attention.key_length", hidden // heads),
           "rms_norm_eps": _field(reader, f"{arch}.attention.layer_norm_rms_epsilon"),
           "rope_theta": _field(reader, f"{arch}.rope.freq_base", 10000.0),
           "max_position_embeddings": _field(reader, f"{arch}.context_length", 2048),
           "vocab_size": _vocab_size(reader, arch),
           "tie_word_embeddings": "output.weight" not in names,
           "attention_bias": "blk.0.attn_q.bias" in names,
           "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", None),
           "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id", None),
           "torch_dtype": "float32"}
    return {key: value for key, value in raw.items() if value is not None}


def _vocab_size(reader, arch: str) -> int:
    size = _field(reader, f"{arch}.vocab_size", None)
    if size is not None:
        return size
    return int(next(t.shape[1] for t in reader.tensors if t.name == "token_embd.weight"))


_REQUIRED = object()


def _field(reader, key: str, default=_REQUIRED):
    field = reader.get_field(key)
    if field is None:
        if default is _REQUIRED:
            raise CheckpointError(f"GGUF metadata lacks {key}")
        return default
    value = field.contents()
    return value.item() if hasattr(value, "item") else value

"""The architecture of a checkpoint, read from its Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None          # e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int
    sliding_window: int | None         # attention window, where the checkpoint uses one
    tie_word_embeddings: bool
    attention_bias: bool               # q/k/v projections carry a bias (Qwen2)
    qk_norm: bool                      # per-head RMSNorm of q and k (Qwen3)
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str                   # "float32", "bfloat16" or "float16"

    @property
    def context_limit(self) -> int:
        """The longest context served exactly. Sliding-window attention is not implemented, so
        a windowed checkpoint is served up to its window, where full attention is the same."""
        return min(self.max_position_embeddings, self.sliding_window or 1 << 62)

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token over all layers, in the checkpoint's dtype."""
        width = 4 if self.torch_dtype == "float32" else 2
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * width

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """The config of a checkpoint directory (config.json) or of a .gguf file."""
        if Path(model_dir).suffix == ".gguf":
            from .gguf_checkpoint import gguf_model_config
            return gguf_model_config(model_dir)
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: no config.json in the model directory")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> ModelConfig:
        fields = _ConfigFields(raw, source)
        model_type = fields.get("model_type", str)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        num_heads = fields.get("num_attention_heads", int)
        hidden = fields.get("hidden_size", int)
        num_kv_heads = fields.get("num_key_value_heads", int, default=num_heads)
        head_dim = fields.get("head_dim", int, default=None) or hidden // num_heads
        if num_heads % num_kv_heads:
            raise CheckpointError(f"{source}: num_attention_heads={num_heads} is not a multiple "
                                  f"of num_key_value_heads={num_kv_heads}")
        theta, scaling = _rope_settings(fields)
        return cls(
            model_type=model_type,
            vocab_size=fields.get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=fields.get("intermediate_size", int),
            num_layers=fields.get("num_hidden_layers", int),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=fields.get("rms_norm_eps", float, default=1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=fields.get("max_position_embeddings", int, default=2048),
            sliding_window=_sliding_window(fields, model_type),
            tie_word_embeddings=fields.get("tie_word_embeddings", bool, default=False),
            attention_bias=(model_type == "qwen2"
                            or fields.get("attention_bias", bool, default=False)),
            qk_norm=model_type == "qwen3",
            bos_token_id=fields.get("bos_token_id", int, default=None),
            eos_token_ids=_eos_ids(fields),
            torch_dtype=_dtype_name(fields),
        )


class _ConfigFields:
    """Typed access to config.json fields with errors that name the field."""

    _MISSING = object()

    def __init__(self, raw: dict, source: str):
        if not isinstance(raw, dict):
            raise CheckpointError(f"{source}: expected a JSON object")
        self.raw, self.source = raw, source

    def get(self, name: str, kind: type, default=_MISSING):
        value = self.raw.get(name)
        if value is None:
            if default is self._MISSING:
                raise CheckpointError(f"{self.source}: missing field {name!r}")
            return default
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise CheckpointError(f"{self.source}: field {name!r} should be {kind.__name__}, "
                                  f"got {value!r}")
        return value


def _rope_settings(fields: _ConfigFields) -> tuple[float, dict | None]:
    """(theta, scaling) from transformers-5 `rope_parameters` or `rope_theta` + `rope_scaling`."""
    params = fields.raw.get("rope_parameters")
    if isinstance(params, dict):
        theta = float(params.get("rope_theta", fields.get("rope_theta", float, default=10000.0)))
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta = fields.get("rope_theta", float, default=10000.0)
        scaling = fields.raw.get("rope_scaling")
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind == "default":
            return theta, None
        if kind != "llama3":
            raise CheckpointError(f"{fields.source}: rope scaling type {kind!r} is not supported "
                                  "(supported: default, llama3)")
        scaling = {**scaling, "rope_type": "llama3"}
    return theta, scaling


def _sliding_window(fields: _ConfigFields, model_type: str) -> int | None:
    """Mistral applies `sliding_window` whenever set; Qwen only with `use_sliding_window`."""
    if model_type.startswith("qwen") and not fields.get("use_sliding_window", bool, default=False):
        return None
    return fields.get("sliding_window", int, default=None)


def _eos_ids(fields: _ConfigFields) -> tuple[int, ...]:
    eos = fields.raw.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _dtype_name(fields: _ConfigFields) -> str:
    name = fields.raw.get("dtype") or fields.raw.get("torch_dtype") or "float32"
    if name not in ("float32", "bfloat16", "float16"):
        raise CheckpointError(f"{fields.source}: dtype {name!r} is not supported "
                              "(supported: float32, bfloat16, float16)")
    return name

"""Hugging Face safetensors checkpoints: find the weight files, check every tensor against the
config, and load only what the model uses. Pickled weights are refused, never unpickled."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError
from .model_config import ModelConfig
from .tensor_shard import WHOLE, TensorShard

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FLOAT_CODES = ("F64", "F32", "F16", "BF16")
_PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth")


def load_checkpoint(model_dir: str | Path, dtype: str | torch.dtype | None = None,
                    shard: TensorShard = WHOLE
                    ) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The config and weights of `model_dir`, cast to `dtype` (None: the checkpoint's dtype):
    of each tensor, the slice `shard` holds. Safetensors are read slice by slice; a GGUF
    file is dequantized whole, then sliced."""
    model_dir = Path(model_dir)
    if shard.size > 1:
        _check_divisible(model_dir, shard)
    if model_dir.suffix == ".gguf":
        from .gguf_checkpoint import load_gguf_checkpoint
        config, weights = load_gguf_checkpoint(model_dir, resolve_dtype(dtype) if dtype else None)
        if shard.size > 1:      # copies, so that the whole tensors are freed
            weights = {name: take_shard(t, *shard.rows_and_columns(name, config)).clone()
                       for name, t in weights.items()}
        return config, weights
    if not model_dir.is_dir():
        raise CheckpointError(f"{model_dir}: model directory does not exist")
    config = ModelConfig.from_dir(model_dir)
    return config, load_weights(model_dir, config, resolve_dtype(dtype or config.torch_dtype),
                                shard)


def _check_divisible(model_dir: Path, shard: TensorShard) -> None:
    problem = shard.problem(ModelConfig.from_dir(model_dir))
    if problem:
        raise CheckpointError(f"{model_dir}: cannot be split over {shard.size} ranks: {problem}")


def take_shard(tensor, rows: tuple[int, int] | None, columns: tuple[int, int] | None):
    """`tensor[rows, columns]` (a safetensors slice view or a tensor); None takes a dimension
    whole."""
    if columns is None:
        return tensor[slice(*rows)] if rows else tensor[:]
    return tensor[slice(*rows) if rows else slice(None), slice(*columns)]


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """torch dtype for "float32", "bfloat16", "float16" or one of those torch dtypes."""
    if dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported (supported: {', '.join(DTYPES)})")
    return DTYPES[dtype]


def expected_tensor_names(config: ModelConfig) -> list[str]:
    """Hugging Face names of every tensor the model needs, in a stable order."""
    return list(expected_tensor_shapes(config))


def expected_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the model needs, as config.json implies them."""
    hidden = config.hidden_size
    shapes = {"model.embed_tokens.weight": (config.vocab_size, hidden)}
    for layer in range(config.num_layers):
        shapes.update(_layer_shapes(config, f"model.layers.{layer}."))
    shapes["model.norm.weight"] = (hidden,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    return shapes


def _layer_shapes(config: ModelConfig, prefix: str) -> dict[str, tuple[int, ...]]:
    hidden, inner, head = config.hidden_size, config.intermediate_size, config.head_dim
    q_width, kv_width = config.num_heads * head, config.num_kv_heads * head
    attn = prefix + "self_attn."
    shapes = {attn + "q_proj.weight": (q_width, hidden), attn + "k_proj.weight": (kv_width, hidden),
              attn + "v_proj.weight": (kv_width, hidden), attn + "o_proj.weight": (hidden, q_width)}
    if config.attention_bias:
        shapes.update({attn + "q_proj.bias": (q_width,), attn + "k_proj.bias": (kv_width,),
                       attn + "v_proj.bias": (kv_width,)})
    if config.qk_norm:
        shapes.update({attn + "q_norm.weight": (head,), attn + "k_norm.weight": (head,)})
    shapes.update({prefix + "input_layernorm.weight": (hidden,),
                   prefix + "post_attention_layernorm.weight": (hidden,),
                   prefix + "mlp.gate_proj.weight": (inner, hidden),
                   prefix + "mlp.up_proj.weight": (inner, hidden),
                   prefix + "mlp.down_proj.weight": (hidden, inner)})
    return shapes


def load_weights(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
                 shard: TensorShard = WHOLE) -> dict[str, torch.Tensor]:
    """The tensors `config` needs from the safetensors files of `model_dir`, cast to `dtype`:
    only the slice of each that `shard` holds is read."""
    def read(file, name: str) -> torch.Tensor:
        rows, columns = shard.rows_and_columns(name, config)
        if rows is None and columns is None:
            return file.get_tensor(name).to(dtype)
        return take_shard(file.get_slice(name), rows, columns).contiguous().to(dtype)
    return _gather(model_dir, config, read)


def check_weights(model_dir: str | Path, config: ModelConfig) -> None:
    """Raise `CheckpointError` unless every tensor `config` needs is in the safetensors files
    of `model_dir` with the right shape, in a file as long as its header says (a truncated
    download fails here); reads headers only, no tensor data."""
    _gather(model_dir, config, lambda file, name: None)


def _gather(model_dir: str | Path, config: ModelConfig, read) -> dict:
    """`read(file, name)` of each tensor `config` needs, after checking it."""
    model_dir = Path(model_dir)
    shapes = expected_tensor_shapes(config)
    files = _weight_files(model_dir)
    weights: dict = {}
    for path in files:
        weights.update(_read_file(path, shapes, read))
    missing = [name for name in shapes if name not in weights]
    if missing:
        searched = ", ".join(path.name for path in files)
        raise CheckpointError(f"{model_dir}: tensor {missing[0]!r} is missing ({len(missing)} "
                              f"missing in all; searched {searched})")
    return {name: weights[name] for name in shapes}


def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of `model_dir`: the shards its index names, or model.safetensors."""
    if (model_dir / INDEX_FILE).is_file():
        return _shards(model_dir / INDEX_FILE)
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    pickles = sorted({p.name for pattern in _PICKLE_PATTERNS for p in model_dir.glob(pattern)})
    if pickles:
        raise CheckpointError(
            f"{model_dir}: holds only pickled weights ({', '.join(pickles)}); mpiserve never "
            "unpickles weights, since unpickling can run arbitrary code. Convert them once with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, "
            "safe_serialization=True)")
    raise CheckpointError(f"{model_dir}: no weights found (expected {SINGLE_FILE} or {INDEX_FILE})")


def _shards(index: Path) -> list[Path]:
    try:
        raw = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: not valid JSON ({exc})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: field 'weight_map' is missing or not a map of "
                              "tensor names to file names")
    shards = [index.parent / name for name in sorted(set(weight_map.values()))]
    absent = [path.name for path in shards if not path.is_file()]
    if absent:
        raise CheckpointError(f"{index}: names shard {absent[0]!r}, which is not in {index.parent}")
    return shards


def _read_file(path: Path, shapes: dict[str, tuple[int, ...]], read) -> dict:
    try:
        with safe_open(path, framework="pt") as file:
            present = set(file.keys())
            _refuse_unused(path, present, shapes)
            return {name: _read_tensor(file, path, name, shape, read)
                    for name, shape in shapes.items() if name in present}
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from None


def _refuse_unused(path: Path, names, shapes: dict[str, tuple[int, ...]]) -> None:
    """Layer parameters the model would ignore mean an unsupported variant: fail, don't guess."""
    unused = sorted(name for name in names if name not in shapes
                    and name.startswith("model.layers.") and name.endswith((".weight", ".bias")))
    if unused:
        raise CheckpointError(f"{path}: holds {unused[0]!r} ({len(unused)} such tensors), a layer "
                              "parameter config.json does not account for; this variant of the "
                              "architecture is not supported")


def _read_tensor(file, path: Path, name: str, shape: tuple[int, ...], read):
    view = file.get_slice(name)
    got = tuple(view.get_shape())
    if got != shape:
        raise CheckpointError(f"{path}: tensor {name!r} has shape {list(got)}, but config.json "
                              f"implies {list(shape)}")
    if view.get_dtype() not in _FLOAT_CODES:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {view.get_dtype()}; only "
                              "unquantized float checkpoints are supported")
    return read(file, name)

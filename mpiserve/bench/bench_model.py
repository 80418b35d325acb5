"""The serving benchmarks' model: a seeded random Llama checkpoint built with transformers into
the mpiserve cache on first use (never downloaded), with the demo model's tokenizer.

`BENCH` is big enough that prefill dominates a long request on one CPU core (about 34M
parameters; a 2000-token prompt takes seconds, one decode step tens of milliseconds) and has a
4096-token context. `QUICK` is a tiny one for smoke tests. Same shape, same weights: the build
is seeded, and a finished build is renamed into place atomically, so processes may race.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

from ..model.model_cache import cached_checkpoint

SEED = 20250305
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelShape:
    name: str                           # directory name in the cache
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def params(self) -> int:
        """Parameters (untied embeddings, no biases)."""
        h, kv = self.hidden_size, self.num_key_value_heads * self.head_dim
        layer = 2 * h * h + 2 * h * kv + 3 * h * self.intermediate_size + 2 * h
        return 2 * self.vocab_size * h + self.num_hidden_layers * layer + h

    def kv_bytes_per_token(self, element_size: int = 4) -> int:
        return (2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim
                * element_size)

    def describe(self) -> str:
        return (f"Llama, {self.params() / 1e6:.1f}M parameters, float32: vocab "
                f"{self.vocab_size}, hidden {self.hidden_size}, {self.num_hidden_layers} layers, "
                f"{self.num_attention_heads} heads / {self.num_key_value_heads} KV heads of "
                f"{self.head_dim}, intermediate {self.intermediate_size}, context "
                f"{self.max_position_embeddings}, untied embeddings; KV "
                f"{self.kv_bytes_per_token() // 1024} KiB per token")

    def config(self, **overrides) -> dict:
        """transformers LlamaConfig arguments; `overrides` replace or add fields."""
        fields = asdict(self)
        del fields["name"]
        return {**fields, "head_dim": self.head_dim, "hidden_act": "silu", "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "tie_word_embeddings": False, "attention_bias": False,
                "mlp_bias": False, "bos_token_id": 0, "eos_token_id": 1, **overrides}


BENCH = ModelShape("bench-llama-34m-v1", vocab_size=8192, hidden_size=512,
                   intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=4096)
# SmolLM2-135M's shape with 8 query heads of 72 (SmolLM2's 9 do not split over 2 ranks) and
# untied embeddings: about 166M parameters, for the tensor-parallel benchmark
TP_BENCH = ModelShape("bench-llama-166m-v1", vocab_size=49152, hidden_size=576,
                      intermediate_size=1536, num_hidden_layers=30, num_attention_heads=8,
                      num_key_value_heads=4, max_position_embeddings=2048)
QUICK = ModelShape("bench-llama-tiny-v1", vocab_size=2048, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=4096)


def bench_model_dir(shape: ModelShape = BENCH) -> Path:
    """The checkpoint directory of `shape` in the mpiserve cache, built on first use."""
    return cached_checkpoint(shape.name, lambda directory: write_model(directory, shape))


def write_model(directory: Path, shape: ModelShape, **config_overrides) -> int:
    """Save a seeded random LlamaForCausalLM of `shape` and the demo model's tokenizer into
    `directory`; returns the parameter count."""
    try:
        import transformers
    except ImportError:
        raise SystemExit("building the benchmark model needs transformers "
                         "(pip install transformers), or pass --model DIR") from None
    import torch

    from ..model.demo_model import VOCAB_SIZE, demo_model_dir
    if shape.vocab_size < VOCAB_SIZE:
        raise ValueError(f"{shape.name}: vocabulary {shape.vocab_size} is smaller than the demo "
                         f"tokenizer's {VOCAB_SIZE}")
    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(**shape.config(**config_overrides))
    model = transformers.LlamaForCausalLM(config).to(torch.float32).eval()
    model.save_pretrained(directory)
    for name in TOKENIZER_FILES:
        shutil.copy(demo_model_dir() / name, directory / name)
    return sum(p.numel() for p in model.parameters())

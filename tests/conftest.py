"""Shared fixtures: a private mpiserve cache for the whole session, the demo model, and tiny random
Hugging Face checkpoints of every supported architecture (tokenizer copied from the demo model)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import mpiserve  # noqa: F401  first: it takes the checkout's root off sys.path (kernels/ clash)

torch.set_num_threads(1)
# jobs and LLMs started without a model serve the tiny random demo model, even where the demo
# extra (SmolLM2) is installed; mpiexec children inherit this
os.environ["MPISERVE_DEMO_MODEL"] = "random"

TINY = dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            bos_token_id=0, eos_token_id=1)
# rope_theta + rope_scaling: accepted by transformers 4 and 5 (5 folds them into rope_parameters)
LLAMA3_ROPE = {"rope_theta": 500000.0,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
TIED = {"tie_word_embeddings": True}
# arch -> (transformers config class, model class, settings on top of TINY)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", LLAMA3_ROPE),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", TIED),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen2_tied": ("Qwen2Config", "Qwen2ForCausalLM", TIED),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32}),
    "qwen3_tied": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 32, **TIED}),
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session", autouse=True)
def mpiserve_cache(tmp_path_factory) -> Path:
    """MPISERVE_CACHE points at a session temp dir, so tests never touch the user's cache."""
    path = tmp_path_factory.mktemp("mpiserve-cache")
    previous = os.environ.get("MPISERVE_CACHE")
    os.environ["MPISERVE_CACHE"] = str(path)
    yield path
    if previous is None:
        del os.environ["MPISERVE_CACHE"]
    else:
        os.environ["MPISERVE_CACHE"] = previous


@pytest.fixture(scope="session")
def demo_dir(mpiserve_cache) -> Path:
    from mpiserve.model.demo_model import demo_model_dir
    return demo_model_dir()


@pytest.fixture(scope="session")
def tiny_hf_model(tmp_path_factory, demo_dir):
    """Factory: tiny_hf_model(arch, dtype="float32", max_shard_size="50GB", **config_overrides)
    -> directory of a random checkpoint saved by transformers. Same arguments, same directory;
    same config, same weights (seeded)."""
    built: dict[str, Path] = {}

    def build(arch: str, dtype: str = "float32", max_shard_size: str = "50GB",
              **overrides) -> Path:
        key = repr((arch, dtype, max_shard_size, sorted(overrides.items())))
        if key not in built:
            directory = tmp_path_factory.mktemp(f"tiny-{arch}")
            _save_tiny_model(directory, arch, dtype, max_shard_size, overrides)
            for name in TOKENIZER_FILES:
                shutil.copy(demo_dir / name, directory / name)
            built[key] = directory
        return built[key]

    return build


def _save_tiny_model(directory: Path, arch: str, dtype: str, max_shard_size: str,
                     overrides: dict) -> None:
    import transformers
    config_class, model_class, settings = ARCHS[arch]
    config = getattr(transformers, config_class)(**{**TINY, **settings, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_class)(config).to(getattr(torch, dtype))
    model.save_pretrained(directory, max_shard_size=max_shard_size)

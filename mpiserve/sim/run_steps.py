"""Steps timed inside real jobs, read back from their run directories' `steps.json` (pure):
what `mpiserve profile --from-run` fits the step-time model to."""

from __future__ import annotations

import json
from pathlib import Path

from ..dashboard.report import STEPS_FILE
from ..engine.step_timings import samples_of
from .profiled_cost import ProfileError


def run_step_samples(run_dirs: list[str], tp: int) -> list[dict]:
    """Every engine's sampled steps of every run directory, as dicts of the step's shape and
    `seconds`; an error names a directory without the file, with no steps, or with engines of
    another tensor-parallel size than `tp` (the profile's)."""
    samples = []
    for run_dir in run_dirs:
        path = Path(run_dir) / STEPS_FILE
        try:
            engines = json.loads(path.read_text())["engines"]
        except FileNotFoundError:
            raise ProfileError(f"{path}: missing (written at the end of a job by this "
                               f"version of `mpiserve run` or `serve`)") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise ProfileError(f"{path}: malformed ({exc})") from None
        other = sorted({e.get("tp") for e in engines.values()} - {tp}, key=str)
        if other:
            raise ProfileError(f"{path}: engines of tensor-parallel size {other[0]}; the base "
                               f"profile measured TP {tp}")
        found = [s for timings in engines.values() for s in samples_of(timings)]
        if not found:
            raise ProfileError(f"{path}: no engine of the job ran a step")
        samples += found
    return samples

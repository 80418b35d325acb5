"""A bounded, uniform sample of an engine's timed steps, each its shape and seconds (pure).

A job's engines keep one and hand it to rank 0 at the end; the run directory's `steps.json`
holds them, and `mpiserve profile --from-run` fits the simulator's step-time model to them: the
steps as they cost inside a job (ranks sharing cores, the engine loop's own work), not alone."""

from __future__ import annotations

import random
from collections.abc import Sequence

CAPACITY = 4000      # steps kept per engine: enough for a five-term least-squares fit


class StepTimings:
    """Every step until `capacity`, then a reservoir sample: each step seen is kept with the
    same chance, so a long job's sample covers all of it."""

    def __init__(self, fields: Sequence[str], capacity: int = CAPACITY, seed: int = 0):
        self.fields = [*fields, "seconds"]
        self.capacity = capacity
        self.seen = 0
        self.rows: list[list[float]] = []
        self._rng = random.Random(seed)

    def add(self, shape: Sequence[int], seconds: float) -> None:
        row = [*shape, seconds]
        self.seen += 1
        if len(self.rows) < self.capacity:
            self.rows.append(row)
            return
        slot = self._rng.randrange(self.seen)
        if slot < self.capacity:
            self.rows[slot] = row

    def to_json(self) -> dict:
        return {"fields": self.fields, "seen": self.seen, "rows": self.rows}


def samples_of(timings: dict) -> list[dict]:
    """The rows of a `to_json()` as one dict per step, keyed by field."""
    return [dict(zip(timings["fields"], row)) for row in timings["rows"]]

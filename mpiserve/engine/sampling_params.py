"""Per-request sampling and stopping settings."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import InvalidRequestError


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False

    def __post_init__(self):
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            object.__setattr__(self, "stop", tuple(self.stop or ()))
        self._check("max_tokens", self.max_tokens >= 1, "must be at least 1")
        self._check("temperature", self.temperature >= 0, "must be >= 0")
        self._check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        self._check("top_k", self.top_k == -1 or self.top_k >= 1, "must be -1 (off) or >= 1")
        self._check("stop", all(isinstance(s, str) and s for s in self.stop),
                    "must be non-empty strings")

    def _check(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise InvalidRequestError(f"SamplingParams.{name}={getattr(self, name)!r} {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

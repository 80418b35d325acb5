"""Per-request sampling, scoring and stopping settings.

Penalties follow OpenAI (`presence_penalty`, `frequency_penalty`: over the tokens generated so
far) and transformers (`repetition_penalty`: over prompt and generated tokens). Log
probabilities (`logprobs`, `prompt_logprobs`: how many most likely alternatives to return
beside each token, 0 for none) are those of the model's own distribution, before penalties,
bias and temperature, as vLLM reports them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from ..errors import InvalidRequestError

MAX_LOGPROBS = 20          # alternatives per token, as OpenAI's top_logprobs
MAX_SAMPLES = 128          # n


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    n: int = 1                                   # samples of one prompt, sharing its prefill
    logprobs: int | None = None                  # per generated token; None: off
    prompt_logprobs: int | None = None           # per prompt token (echo); None: off
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0                          # eos and stop_token_ids masked until then
    logit_bias: tuple[tuple[int, float], ...] = ()   # (token id, bias); a dict is accepted
    stop_token_ids: tuple[int, ...] = ()

    def __post_init__(self):
        self._normalize()
        self._check("max_tokens", self.max_tokens >= 1, "must be at least 1")
        self._check("temperature", self.temperature >= 0, "must be >= 0")
        self._check("top_p", 0 < self.top_p <= 1, "must be in (0, 1]")
        self._check("top_k", self.top_k == -1 or self.top_k >= 1, "must be -1 (off) or >= 1")
        self._check("stop", all(isinstance(s, str) and s for s in self.stop),
                    "must be non-empty strings")
        self._check("n", 1 <= self.n <= MAX_SAMPLES, f"must be in [1, {MAX_SAMPLES}]")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            self._check(name, value is None or 0 <= value <= MAX_LOGPROBS,
                        f"must be None (off) or in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            self._check(name, -2 <= getattr(self, name) <= 2, "must be in [-2, 2]")
        self._check("repetition_penalty", self.repetition_penalty > 0, "must be > 0")
        self._check("min_tokens", 0 <= self.min_tokens <= self.max_tokens,
                    f"must be in [0, max_tokens={self.max_tokens}]")
        self._check("logit_bias", all(t >= 0 and -100 <= b <= 100 for t, b in self.logit_bias),
                    "must map token ids >= 0 to biases in [-100, 100]")
        self._check("stop_token_ids", all(t >= 0 for t in self.stop_token_ids),
                    "must be token ids >= 0")

    def _normalize(self) -> None:
        """Accept a str for `stop`, a dict for `logit_bias` and any iterables; store tuples."""
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "logit_bias",
                           tuple((int(t), float(b)) for t, b in sorted(bias or ())))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    def _check(self, name: str, ok: bool, rule: str) -> None:
        if not ok:
            raise InvalidRequestError(f"SamplingParams.{name}={getattr(self, name)!r} {rule}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def shapes_logits(self) -> bool:
        """Whether anything but temperature/top-k/top-p changes the logits before sampling."""
        return bool(self.presence_penalty or self.frequency_penalty or self.min_tokens
                    or self.repetition_penalty != 1.0 or self.logit_bias)

    def for_sample(self, index: int) -> SamplingParams:
        """The settings of sample `index` of n: its own seed (seed + index) when seeded."""
        if index == 0 or self.seed is None:
            return self
        return replace(self, seed=self.seed + index)

"""Step and KV-transfer times fitted to measurements of a real engine (`mpiserve profile`),
read from its JSON profile (pure).

    step     = intercept_s + per_prefill_token_s * prefill_tokens
               + per_decode_seq_s * decode_seqs + per_context_token_s * context_tokens
               + per_attention_pair_s * attention_pairs
    transfer = latency_s + per_byte_s * bytes

While another engine on the same host steps too (CPU engines share its caches and memory
bandwidth), a step's prefill terms take `co_run.prefill` times as long and the rest
`co_run.rest` times, per such neighbour; both are 1.0 in a profile that did not measure it.

The profile was measured on one engine of `tp` devices; the simulator uses it for engines of
that size only.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..engine.step_shape import StepShape
from ..errors import MpiserveError

PROFILE_KIND = "mpiserve-profile"
STEP_TERMS = ("intercept_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s",
              "per_attention_pair_s")
# the step model's terms that grow with the prompt tokens a step computes, and their shape field
PREFILL_TERMS = {"per_prefill_token_s": "prefill_tokens",
                 "per_attention_pair_s": "attention_pairs"}


class ProfileError(MpiserveError):
    pass


@dataclass(frozen=True)
class StepFit:
    intercept_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    per_attention_pair_s: float = 0.0      # absent from profiles written before it existed

    def __call__(self, shape: StepShape) -> float:
        return max(0.0, self.intercept_s + self.per_prefill_token_s * shape.prefill_tokens
                   + self.per_decode_seq_s * shape.decode_seqs
                   + self.per_context_token_s * shape.context_tokens
                   + self.per_attention_pair_s * shape.attention_pairs)

    def prefill_part(self, shape: StepShape) -> float:
        """The seconds of its terms that grow with the prompt tokens the step computes."""
        return sum(getattr(self, term) * getattr(shape, field)
                   for term, field in PREFILL_TERMS.items())


@dataclass(frozen=True)
class CoRunFit:
    """How much longer a step's prefill part and its rest take beside one neighbour that
    steps at the same time."""
    prefill: float = 1.0
    rest: float = 1.0

    def slowdown(self, step: StepFit, shape: StepShape) -> float:
        """The fraction of its time alone that each stepping neighbour adds to a step."""
        alone = step(shape)
        if alone <= 0:
            return 0.0
        prefill = step.prefill_part(shape)
        return ((self.prefill - 1) * prefill + (self.rest - 1) * (alone - prefill)) / alone


@dataclass(frozen=True)
class TransferFit:
    latency_s: float
    per_byte_s: float

    def __call__(self, nbytes: int) -> float:
        return self.latency_s + self.per_byte_s * nbytes


@dataclass(frozen=True)
class ProfiledCost:
    step: StepFit
    transfer: TransferFit
    kv_bytes_per_token: int
    tp: int = 1
    page_size: int = 16
    pages: int = 0                      # the profiled engine's KV pages (0: unknown)
    vocab_size: int = 32000
    max_model_len: int = 2048
    source: str = ""                    # what was measured: model, device
    co_run: CoRunFit = CoRunFit()      # absent (1.0, 1.0) from profiles that did not measure it

    def step_time(self, shape: StepShape, tp: int = 1) -> float:
        self._check_tp(tp)
        return 0.0 if shape.tokens == 0 else self.step(shape)

    def co_run_slowdown(self, shape: StepShape) -> float:
        """The fraction of its time alone that each neighbour stepping beside it adds."""
        return self.co_run.slowdown(self.step, shape)

    def kv_transfer_time(self, nbytes: int, sender_tp: int = 1, receiver_tp: int = 1) -> float:
        return self.transfer(nbytes)

    def num_pages(self, page_size: int, tp: int = 1) -> int:
        self._check_tp(tp)
        if not self.pages:
            raise ProfileError("the profile records no KV page count; give --num-pages")
        return max(1, self.pages * self.page_size // page_size)

    def _check_tp(self, tp: int) -> None:
        if tp != self.tp:
            raise ProfileError(f"the profile measured engines of TP {self.tp}, not {tp}; "
                               "profile that size or use --hardware")

    def describe(self) -> str:
        return f"profile: {self.source}"

    def to_json(self) -> dict:
        """The profile as JSON data (readers ignore keys they do not know: samples, ...)."""
        return {"kind": PROFILE_KIND, "version": 1, **asdict(self)}

    @classmethod
    def from_json(cls, data: dict, source: str = "profile") -> ProfiledCost:
        if not isinstance(data, dict) or data.get("kind") != PROFILE_KIND:
            raise ProfileError(f"{source}: not an mpiserve profile (write one with "
                               "`mpiserve profile`)")
        try:
            known = {f.name for f in fields(cls)} - {"step", "transfer", "co_run"}
            return cls(StepFit(**data["step"]), TransferFit(**data["transfer"]),
                       co_run=CoRunFit(**data.get("co_run", {})),
                       **{k: v for k, v in data.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise ProfileError(f"{source}: malformed profile ({exc})") from None

    @classmethod
    def load(cls, path: str | Path) -> ProfiledCost:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ProfileError(f"--profile {path}: cannot read ({exc})") from None
        return cls.from_json(data, str(path))

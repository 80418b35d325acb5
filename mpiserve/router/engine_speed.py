"""How fast an engine computes, estimated from the counters in its stats snapshots (pure
bookkeeping).

Each snapshot carries cumulative `prefill_tokens`, `decode_tokens` and `busy_s` (seconds spent
in engine steps). Between two snapshots the busy time is split between the two kinds of work:
an interval with only one kind of token is charged to it entirely; a mixed interval charges the
decode tokens at the current decode cost per token (at most `MIXED_DECODE_SHARE_CAP` of the
interval) and the rest to prefill. Costs are ratios of exponentially decayed sums (busy seconds
over tokens), so one odd interval moves them a little, and a recent change of speed shows within
a few snapshots. Idle time is not busy time: the rates are compute speeds, not utilisation.
"""

from __future__ import annotations

from dataclasses import dataclass

MIXED_DECODE_SHARE_CAP = 0.9


@dataclass(frozen=True)
class Speed:
    """Tokens per second of busy time; None until the engine has done that kind of work."""
    prefill_rate: float | None
    decode_rate: float | None


class _DecayedRatio:
    """sum(seconds) / sum(tokens) over samples, older samples weighing `decay` times less."""

    def __init__(self, decay: float):
        self.decay = decay
        self.seconds = 0.0
        self.tokens = 0.0

    def add(self, seconds: float, tokens: float) -> None:
        self.seconds = self.seconds * self.decay + seconds
        self.tokens = self.tokens * self.decay + tokens

    @property
    def seconds_per_token(self) -> float | None:
        return self.seconds / self.tokens if self.tokens > 0 and self.seconds > 0 else None


class SpeedEstimator:
    """Feed it an engine's snapshots in order with `observe`; read `speed`."""

    def __init__(self, decay: float = 0.7, min_tokens: int = 1):
        self.min_tokens = min_tokens
        self._prefill = _DecayedRatio(decay)
        self._decode = _DecayedRatio(decay)
        self._last: tuple[float, float, float] | None = None

    def observe(self, prefill_tokens: float, decode_tokens: float, busy_s: float) -> None:
        now = (float(prefill_tokens), float(decode_tokens), float(busy_s))
        last, self._last = self._last, now
        if last is None:
            return
        d_prefill, d_decode, d_busy = (b - a for a, b in zip(last, now))
        if d_busy <= 0 or d_prefill < 0 or d_decode < 0 or d_prefill + d_decode < self.min_tokens:
            return                                    # nothing new, or the counters restarted
        if d_decode == 0:
            self._prefill.add(d_busy, d_prefill)
        elif d_prefill == 0:
            self._decode.add(d_busy, d_decode)
        else:
            per_decode = self._decode.seconds_per_token
            decode_s = 0.0 if per_decode is None else min(per_decode * d_decode,
                                                          MIXED_DECODE_SHARE_CAP * d_busy)
            self._prefill.add(d_busy - decode_s, d_prefill)

    def observe_stats(self, stats: dict) -> None:
        """`observe` the counters of one engine stats snapshot (missing counters: skipped)."""
        try:
            self.observe(stats["prefill_tokens"], stats["decode_tokens"], stats["busy_s"])
        except KeyError:
            pass

    @property
    def speed(self) -> Speed:
        def rate(ratio: _DecayedRatio) -> float | None:
            cost = ratio.seconds_per_token
            return None if cost is None else 1.0 / cost
        return Speed(rate(self._prefill), rate(self._decode))

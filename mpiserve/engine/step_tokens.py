"""The next tokens of one step's sequences, chosen from the step's logits.

Plain greedy rows (temperature 0 or top-k 1, nothing reshaping the logits) share one argmax
over all of the step's rows, so a step reads its tokens back from the device once rather
than once per sequence. Other rows are shaped and sampled on the CPU, where every request's
seeded generator lives, so a seed draws the same tokens on either device.
"""

from __future__ import annotations

import torch

from .logits_shaping import shaped_logits
from .sampler import sample
from .sequence import Sequence
from .token_logprobs import token_logprob


class StepTokens:
    def __init__(self, logits: torch.Tensor, eos_ids: tuple[int, ...],
                 generators: dict[int, torch.Generator | None]):
        self.logits = logits                # [rows, vocab] float32, on the model's device
        self.eos_ids = eos_ids
        self.generators = generators        # by id() of the sequence
        self._argmax: list[int] | None = None
        self._on_cpu: torch.Tensor | None = None

    def pick(self, seq: Sequence, row: int) -> int:
        """`seq`'s next token from logits row `row` (and its log probability, when asked)."""
        params = seq.params
        if params.greedy and not params.shapes_logits:
            token = self._greedy()[row]
        else:
            logits = shaped_logits(self._cpu()[row], seq, self.eos_ids)
            token = sample(logits, params, self.generators.get(id(seq)))
        if params.logprobs is not None:
            seq.logprobs.append(token_logprob(self.logits[row], token, params.logprobs))
        return token

    def _greedy(self) -> list[int]:
        # max's indices are argmax's (the first of tied maxima, a NaN's own), and on a CPU
        # `max` took 0.83 ms for 32 rows of a 49,152-word vocabulary where argmax took 2.36
        if self._argmax is None:
            self._argmax = self.logits.max(dim=-1).indices.tolist()
        return self._argmax

    def _cpu(self) -> torch.Tensor:
        if self._on_cpu is None:
            self._on_cpu = self.logits.cpu()
        return self._on_cpu

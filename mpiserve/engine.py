"""One engine: a model, its paged KV cache and a continuous-batching scheduler on one device."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint import load_checkpoint
from .demo_model import demo_model_dir
from .engine_config import EngineConfig
from .errors import InvalidRequestError
from .forward_batch_builder import build_forward_batch, order_chunks
from .kv_cache import KVCache, pages_for_budget
from .model import Transformer
from .page_pool import PagePool
from .sampler import new_generator, sample
from .sampling_params import SamplingParams
from .scheduler import Chunk, Scheduler
from .sequence import Sequence
from .stopping import finish_reason
from .tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenEvent:
    """What one step did for one sequence: a new token, and whether it finished."""
    seq: Sequence
    token: int | None
    finished: bool


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    def __init__(self, config: EngineConfig = EngineConfig()):
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.model_dir = config.model or str(demo_model_dir())
        self.device = pick_device(config.device)
        self.model_config, weights = load_checkpoint(self.model_dir, config.dtype)
        weights = {name: t.to(self.device) for name, t in weights.items()}
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.eos_ids = tuple(set(self.tokenizer.eos_token_ids) | set(self.model_config.eos_token_ids))
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.model = Transformer(self.model_config, weights, self.max_model_len)
        num_pages = config.num_pages or pages_for_budget(
            self.model_config, config.page_size, int(config.kv_cache_gib * 2**30))
        self.pool = PagePool(num_pages, config.page_size)
        self.kv = KVCache(self.model_config, num_pages, config.page_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_batch_tokens,
                                   self.max_model_len)
        self._generators: dict[int, torch.Generator | None] = {}
        self.tokens_computed = {"prefill": 0, "decode": 0}

    # ---- requests ---------------------------------------------------------------------------
    def add_request(self, seq_id, prompt: list[int], params: SamplingParams) -> Sequence:
        seq = Sequence(seq_id, prompt, params)
        self.check_tokens(seq)
        self.scheduler.add(seq)
        self._generators[id(seq)] = new_generator(params)
        return seq

    def check_tokens(self, seq: Sequence) -> None:
        vocab = self.model_config.vocab_size
        bad = next((t for t in seq.prompt if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidRequestError(f"request {seq.seq_id!r}: token id {bad} is outside the "
                                      f"vocabulary of {vocab}")

    def abort(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._generators.pop(id(seq), None)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    # ---- the step ------------------------------------------------------------------------------
    def step(self, after_layer: Callable[[int], None] | None = None) -> list[TokenEvent]:
        chunks = order_chunks(self.scheduler.schedule())
        if not chunks:
            return []
        batch = build_forward_batch(chunks, self.kv, self.device)
        logits = self.model.forward(batch, self.kv.layers, after_layer)
        events, row = [], 0
        for chunk in chunks:
            self.scheduler.computed(chunk)
            self._count(chunk)
            if chunk.samples:
                events.append(self._append_token(chunk.seq, logits[row]))
                row += 1
            elif chunk.seq.prefill_only and chunk.end == chunk.seq.num_tokens:
                events.append(TokenEvent(chunk.seq, None, True))
        return events

    def _count(self, chunk: Chunk) -> None:
        kind = "decode" if chunk.start >= len(chunk.seq.prompt) else "prefill"
        self.tokens_computed[kind] += chunk.length

    def _append_token(self, seq: Sequence, logits: torch.Tensor) -> TokenEvent:
        token = sample(logits, seq.params, self._generators.get(id(seq)))
        seq.output.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        text_of = self.tokenizer.decode if seq.params.stop else None
        seq.finish_reason = finish_reason(seq, self.eos_ids, self.max_model_len, text_of)
        if seq.finish_reason is not None:
            seq.finish_time = time.monotonic()
            self.abort(seq)
        return TokenEvent(seq, token, seq.finish_reason is not None)

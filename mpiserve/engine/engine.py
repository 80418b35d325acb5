"""One engine: a model, its paged KV cache and a continuous-batching scheduler on one device."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..model.checkpoint import load_checkpoint
from ..model.default_model import default_model
from ..model.matmul_dtype import choose_matmul_dtype
from ..model.tensor_parallel import TensorParallel
from ..model.tokenizer import Tokenizer
from ..model.transformer import ForwardBatch, PrefillSpan, Transformer
from .engine_config import EngineConfig
from .engine_core import EngineCore, TokenEvent
from .forward_batch_builder import build_forward_batch, logit_positions, order_chunks
from .heap_reuse import keep_freed_memory
from .kv_cache import KVCache, pages_for_budget
from .page_pool import PagePool
from .sampler import new_generator
from .scheduler import Chunk, Scheduler
from .sequence import Sequence
from .step_tokens import StepTokens
from .token_logprobs import token_logprobs

# Called with a step's chunks before its forward pass; may return a callback run after each
# layer, whose `streams` attribute (if any) tells a tensor-parallel group's other ranks what
# KV to stream out alongside (kv_transfer.KVStream).
LayerHookFactory = Callable[[list[Chunk]], Callable[[int], None] | None]


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine(EngineCore):
    """One engine. In a tensor-parallel group, every rank builds one with its `tp` shard; the
    lead schedules and samples, and hands each step's batch to `plans.publish_step`; the
    other ranks run the same forward passes on their shards (cluster.tp_follower)."""

    def __init__(self, config: EngineConfig | None = None, tp: TensorParallel | None = None,
                 plans=None):
        config = config or EngineConfig()
        torch.set_num_threads(config.torch_threads)
        self.config = config
        self.plans = plans
        self.model_dir = config.model or str(default_model())
        self.device = pick_device(config.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        tp = tp or TensorParallel.single()
        self.model_config, weights = load_checkpoint(self.model_dir, config.dtype, tp.shard)
        weights = {name: t.to(self.device) for name, t in weights.items()}
        self.dtype = weights["model.embed_tokens.weight"].dtype
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        self.eos_ids = tuple(set(self.tokenizer.eos_token_ids)
                             | set(self.model_config.eos_token_ids))
        self.max_model_len = min(config.max_model_len or 1 << 62, self.model_config.context_limit)
        self.matmul_dtype = choose_matmul_dtype(self.dtype, self.device, config.matmul_dtype)
        self.model = Transformer(self.model_config, weights, self.max_model_len, self.matmul_dtype,
                                 tp)
        shard_config = self.model.config                     # this rank's heads
        num_pages = config.num_pages or pages_for_budget(
            shard_config, config.page_size, int(config.kv_cache_gib * 2**30))
        pool = PagePool(num_pages, config.page_size)
        super().__init__(pool, Scheduler(pool, config.max_num_seqs, config.max_batch_tokens,
                                         self.max_model_len),
                         self.model_config.vocab_size, self.eos_ids, self.max_model_len)
        self.kv = KVCache(shard_config, num_pages, config.page_size, self.dtype, self.device)
        self._generators: dict[int, torch.Generator | None] = {}
        self._warm_up()

    def _warm_up(self) -> None:
        """Compile the numba kernels (or load them from numba's disk cache) and let torch pick
        its kernels before the first request, so that request's TTFT is a warm one: a forward
        pass of one decode row and one prefill row over KV slot 0, which no sequence holds
        yet, and a KV read and write of that slot."""
        zero = torch.zeros(2, dtype=torch.int64, device=self.device)
        batch = ForwardBatch(
            input_ids=zero, positions=zero, slots=zero, num_decode=1,
            page_table=torch.zeros((1, 1), dtype=torch.int32, device=self.device),
            context_lens=torch.ones(1, dtype=torch.int32, device=self.device),
            prefills=[PrefillSpan(row=1, length=1, context_slots=zero[:1])],
            logit_rows=torch.arange(2, device=self.device))
        self.model.forward(batch, self.kv.layers)
        self.kv.write(0, zero[:1], self.kv.read(0, zero[:1]))

    # ---- per-sequence sampling state (EngineCore hooks) -------------------------------------
    def _started(self, seq: Sequence) -> None:
        self._generators[id(seq)] = new_generator(seq.params)

    def _retired(self, seq: Sequence) -> None:
        self._generators.pop(id(seq), None)

    def _text_of(self, seq: Sequence):
        return self.tokenizer.decode if seq.params.stop else None

    # ---- the step ------------------------------------------------------------------------------
    def step(self, layer_hook: LayerHookFactory | None = None) -> list[TokenEvent]:
        """Schedule, run the model once, sample. `layer_hook(chunks)` may return a callback
        run after each layer's KV is written (the KV sender streams layers from it)."""
        chunks = order_chunks(self.scheduler.schedule())
        if not chunks:
            return []
        batch = build_forward_batch(chunks, self.kv, self.device)
        after_layer = layer_hook(chunks) if layer_hook is not None else None
        if self.plans is not None:
            self.plans.publish_step(batch, getattr(after_layer, "streams", ()))
        logits = self.model.forward(batch, self.kv.layers, after_layer)
        tokens = StepTokens(logits, self.eos_ids, self._generators)
        events, row = [], 0
        for chunk in chunks:
            positions = logit_positions(chunk)
            if chunk.seq.needs_prompt_logits:
                _score_prompt(chunk.seq, positions, logits[row:row + len(positions)])
            row += len(positions)
            last = row - 1                   # the row a sampling chunk samples from
            events.extend(self.chunk_computed(chunk, lambda seq, r=last: tokens.pick(seq, r)))
        return events

    @property
    def tp_size(self) -> int:
        """Ranks this engine's model is split over (tensor parallelism)."""
        return self.model.tp.size


def _score_prompt(seq: Sequence, positions: list[int], logits: torch.Tensor) -> None:
    """Log probabilities of the prompt tokens that follow `positions` (rows of `logits`), for
    those not scored yet (a recomputed prompt is scored once)."""
    last = len(seq.prompt) - 1
    rows = [i for i, p in enumerate(positions) if len(seq.prompt_logprobs) <= p < last]
    if rows:
        followers = [seq.prompt[positions[i] + 1] for i in rows]
        seq.prompt_logprobs.extend(
            token_logprobs(logits[rows], followers, seq.params.prompt_logprobs))

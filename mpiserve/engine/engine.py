"""One engine: a model, its paged KV cache and a continuous-batching scheduler on one device."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import InvalidRequestError
from ..model.checkpoint import load_checkpoint
from ..model.default_model import default_model
from ..model.matmul_dtype import choose_matmul_dtype
from ..model.tensor_parallel import TensorParallel
from ..model.tokenizer import Tokenizer
from ..model.transformer import ForwardBatch, PrefillSpan, Transformer
from .engine_config import EngineConfig
from .forward_batch_builder import build_forward_batch, logit_positions, order_chunks
from .kv_cache import KVCache, pages_for_budget
from .logits_shaping import shaped_logits
from .page_pool import PagePool
from .sampler import new_generator, sample
from .sampling_params import SamplingParams
from .scheduler import Chunk, Scheduler
from .sequence import Sequence
from .stopping import finish_reason
from .token_logprobs import token_logprob, token_logprobs

# Called with a step's chunks before its forward pass; may return a callback run after each
# layer, whose `streams` attribute (if any) tells a tensor-parallel group's other ranks what
# KV to stream out alongside (kv_transfer.KVStream).
LayerHookFactory = Callable[[list[Chunk]], Callable[[int], None] | None]


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
        self.pool = PagePool(num_pages, config.page_size)
        self.kv = KVCache(shard_config, num_pages, config.page_size, self.dtype, self.device)
        self.scheduler = Scheduler(self.pool, config.max_num_seqs, config.max_batch_tokens,
                                   self.max_model_len)
        self._generators: dict[int, torch.Generator | None] = {}
        self.tokens_computed = {"prefill": 0, "decode": 0}
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
        """Stop a request: the sequence and the other samples forked from it."""
        for each in [seq, *seq.forks]:
            self._retire(each)

    def _retire(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        self._generators.pop(id(seq), None)

    # ---- microserving: KV that moves between engines --------------------------------------
    def reserve(self, seq_id, prompt: list[int], params: SamplingParams,
                end: int) -> Sequence | None:
        """prep_recv: take the cached prefix of prompt[:end] and reserve pages for the rest of
        [0, end). None when the pages are not free yet; raises if they never can be."""
        seq = Sequence(seq_id, prompt, params)
        self.check_tokens(seq)
        self.scheduler.check_fits(seq)
        pages, hashes = self.pool.match_prefix(prompt, limit=min(end, len(prompt) - 1))
        self.pool.acquire(pages)
        fresh = self.pool.pages_for(end) - len(pages)
        if fresh > self.pool.num_available:
            self.pool.release(pages)
            return None
        seq.page_ids = pages + self.pool.allocate(fresh)
        seq.page_hashes = hashes
        seq.num_computed = seq.prefix_matched = len(pages) * self.pool.page_size
        return seq

    def kv_received(self, seq: Sequence, end: int) -> None:
        """The KV of positions [num_computed, end) of a reserved sequence has been written."""
        seq.num_computed = max(seq.num_computed, end)
        self.scheduler.publish_full_pages(seq)

    def drop_reserved_tail(self, seq: Sequence) -> None:
        """A transfer failed: free the pages beyond what the sequence already holds."""
        keep = self.pool.pages_for(seq.num_computed)
        self.pool.release(seq.page_ids[keep:])
        del seq.page_ids[keep:]

    def generate_reserved(self, seq: Sequence) -> None:
        """start_generate on a sequence that holds KV from prep_recv (and remote_send)."""
        if seq.needs_prompt_logits:          # scored here: the received KV is recomputed
            self.release(seq)
            seq.num_computed = 0
        self.scheduler.add(seq)
        self._generators[id(seq)] = new_generator(seq.params)

    def prefill_for_send(self, seq_id, prompt: list[int]) -> Sequence:
        """remote_send: compute the KV of `prompt` (prefix cache first), sample nothing."""
        seq = Sequence(seq_id, prompt, SamplingParams(max_tokens=1), prefill_only=True)
        self.check_tokens(seq)
        self.scheduler.add(seq)
        return seq

    def release(self, seq: Sequence) -> None:
        """Give back the pages of a sequence that left the scheduler (a reservation, a send)."""
        self.scheduler.release_pages(seq)

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

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
        events, row = [], 0
        for chunk in chunks:
            positions = logit_positions(chunk)
            chunk_logits, row = logits[row:row + len(positions)], row + len(positions)
            self.scheduler.computed(chunk)
            self._count(chunk)
            if chunk.seq.needs_prompt_logits:
                _score_prompt(chunk.seq, positions, chunk_logits)
            if chunk.samples:
                events.extend(self._sample_next(chunk.seq, chunk_logits[-1]))
            elif chunk.seq.prefill_only and chunk.end == chunk.seq.num_tokens:
                self.scheduler.finish(chunk.seq, release=False)     # pages go with the send
                events.append(TokenEvent(chunk.seq, None, True))
        return events

    @property
    def tp_size(self) -> int:
        """Ranks this engine's model is split over (tensor parallelism)."""
        return self.model.tp.size

    def _count(self, chunk: Chunk) -> None:
        kind = "decode" if chunk.start >= len(chunk.seq.prompt) else "prefill"
        self.tokens_computed[kind] += chunk.length

    def _sample_next(self, seq: Sequence, logits: torch.Tensor) -> list[TokenEvent]:
        """The sequence's next token; after a request's first, its other n - 1 samples."""
        forks = seq.params.n > 1 and seq.sample_index == 0 and not seq.output
        samples = self._fork(seq) if forks else []        # before seq may finish and free
        return [self._append_token(s, logits) for s in [seq, *samples]]

    def _fork(self, seq: Sequence) -> list[Sequence]:
        """Samples 1..n-1 of a request whose prompt is computed: each holds the prompt's full
        pages with it, samples its first token from the same logits, and then computes only
        the prompt's last partial page, with that token, before decoding on its own."""
        full = len(seq.page_hashes)
        samples = []
        for index in range(1, seq.params.n):
            sample_seq = Sequence(seq.seq_id, seq.prompt, seq.params.for_sample(index),
                                  sample_index=index)
            sample_seq.page_ids, sample_seq.page_hashes = seq.page_ids[:full], list(
                seq.page_hashes)
            self.pool.acquire(sample_seq.page_ids)
            sample_seq.num_computed = full * self.pool.page_size
            sample_seq.prompt_logprobs = seq.prompt_logprobs
            sample_seq.arrival_time = seq.arrival_time
            self.scheduler.add(sample_seq, first=True)
            self._generators[id(sample_seq)] = new_generator(sample_seq.params)
            samples.append(sample_seq)
        seq.forks = samples
        return samples

    def _append_token(self, seq: Sequence, logits: torch.Tensor) -> TokenEvent:
        params = seq.params
        token = sample(shaped_logits(logits, seq, self.eos_ids), params,
                       self._generators.get(id(seq)))
        if params.logprobs is not None:
            seq.logprobs.append(token_logprob(logits, token, params.logprobs))
        seq.output.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        text_of = self.tokenizer.decode if seq.params.stop else None
        seq.finish_reason = finish_reason(seq, self.eos_ids, self.max_model_len, text_of)
        if seq.finish_reason is not None:
            seq.finish_time = time.monotonic()
            self._retire(seq)
        return TokenEvent(seq, token, seq.finish_reason is not None)


def _score_prompt(seq: Sequence, positions: list[int], logits: torch.Tensor) -> None:
    """Log probabilities of the prompt tokens that follow `positions` (rows of `logits`), for
    those not scored yet (a recomputed prompt is scored once)."""
    last = len(seq.prompt) - 1
    rows = [i for i, p in enumerate(positions) if len(seq.prompt_logprobs) <= p < last]
    if rows:
        followers = [seq.prompt[positions[i] + 1] for i in rows]
        seq.prompt_logprobs.extend(
            token_logprobs(logits[rows], followers, seq.params.prompt_logprobs))

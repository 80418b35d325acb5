"""Turns a step's scheduled chunks into the flat tensors the model runs on."""

from __future__ import annotations

import torch

from ..model.transformer import ForwardBatch, PrefillSpan
from .kv_cache import KVCache
from .scheduler import Chunk


def order_chunks(chunks: list[Chunk]) -> list[Chunk]:
    """Single-token chunks first (they take the paged decode kernel), then prefill chunks."""
    return [c for c in chunks if c.length == 1] + [c for c in chunks if c.length > 1]


def logit_positions(chunk: Chunk) -> list[int]:
    """Positions of `chunk` whose next-token logits the step needs, in order: those that
    score the prompt's next token (prompt log probabilities), then the one sampled from."""
    seq = chunk.seq
    positions = []
    if seq.needs_prompt_logits:
        positions.extend(range(chunk.start, min(chunk.end, len(seq.prompt) - 1)))
    if chunk.samples:
        positions.append(chunk.end - 1)
    return positions


def build_forward_batch(chunks: list[Chunk], kv: KVCache, device) -> ForwardBatch:
    """`chunks` must already be in `order_chunks` order."""
    decode = [c for c in chunks if c.length == 1]
    ids, positions, slots, prefills, logit_rows = [], [], [], [], []
    row = 0
    for chunk in chunks:
        seq = chunk.seq
        ids.extend(seq.tokens[chunk.start:chunk.end])
        positions.extend(range(chunk.start, chunk.end))
        if chunk.length == 1:
            slots.append(kv.slots(seq.page_ids, chunk.start, chunk.end))
        else:
            context_slots = kv.slots(seq.page_ids, 0, chunk.end)
            slots.append(context_slots[chunk.start:])
            prefills.append(PrefillSpan(row, chunk.length, context_slots))
        logit_rows.extend(row + p - chunk.start for p in logit_positions(chunk))
        row += chunk.length
    return ForwardBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64, device=device),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slots=torch.cat(slots),
        num_decode=len(decode),
        page_table=_page_table(decode, device),
        context_lens=torch.tensor([c.end for c in decode], dtype=torch.int32, device=device),
        prefills=prefills,
        logit_rows=torch.tensor(logit_rows, dtype=torch.int64, device=device),
    )


def _page_table(decode: list[Chunk], device) -> torch.Tensor:
    width = max((len(c.seq.page_ids) for c in decode), default=0)
    table = torch.zeros((len(decode), width), dtype=torch.int32)
    for i, chunk in enumerate(decode):
        table[i, :len(chunk.seq.page_ids)] = torch.tensor(chunk.seq.page_ids, dtype=torch.int32)
    return table.to(device)

"""Turns a step's scheduled chunks into the flat tensors the model runs on."""

from __future__ import annotations

import torch

from ..model.transformer import ForwardBatch, PrefillSpan
from .kv_cache import KVCache, slot_indices
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
    """`chunks` must already be in `order_chunks` order. The indices are gathered as Python
    ints and each tensor is built once and moved to `device` once: per-row tensor ops and
    copies were a third of a small model's step (and each copy is a transfer on a GPU)."""
    ids, positions, slots, prefills, logit_rows = [], [], [], [], []
    decode_pages, decode_lens = [], []
    row = 0
    for chunk in chunks:
        seq = chunk.seq
        ids.extend(seq.tokens_between(chunk.start, chunk.end))
        positions.extend(range(chunk.start, chunk.end))
        if chunk.length == 1:
            slots.extend(slot_indices(seq.page_ids, kv.page_size, chunk.start, chunk.end))
            decode_pages.append(seq.page_ids)
            decode_lens.append(chunk.end)
        else:
            context_slots = slot_indices(seq.page_ids, kv.page_size, 0, chunk.end)
            slots.extend(context_slots[chunk.start:])
            prefills.append(PrefillSpan(row, chunk.length, _on(device, context_slots)))
        logit_rows.extend(row + p - chunk.start for p in logit_positions(chunk))
        row += chunk.length
    return ForwardBatch(
        input_ids=_on(device, ids),
        positions=_on(device, positions),
        slots=_on(device, slots),
        num_decode=len(decode_pages),
        page_table=_page_table(decode_pages, device),
        context_lens=_on(device, decode_lens, torch.int32),
        prefills=prefills,
        logit_rows=_on(device, logit_rows),
    )


def _page_table(rows: list[list[int]], device) -> torch.Tensor:
    """`[rows, longest]` int32, shorter page lists padded with page 0 (the kernel reads only
    a row's own context)."""
    width = max(map(len, rows), default=0)
    table = torch.tensor([ids + [0] * (width - len(ids)) for ids in rows], dtype=torch.int32)
    return table.view(len(rows), width).to(device)


def _on(device, values: list, dtype: torch.dtype = torch.int64) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device)

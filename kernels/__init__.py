"""Numba CPU kernels with torch references: paged decode attention, prefill attention and KV
slot packing; ``fused_rows`` holds a layer's elementwise chains (residual + RMS norm, rotary)
in one pass.

Each public function dispatches to whichever implementation the benchmark in
``mpiserve.bench.kernels`` measured faster for the tensors it gets.
"""

from .kv_pack import (
    pack_slots,
    pack_slots_numba,
    pack_slots_reference,
    unpack_slots,
    unpack_slots_numba,
    unpack_slots_reference,
)
from .paged_attention import (
    paged_decode_attention,
    paged_decode_attention_numba,
    paged_decode_attention_reference,
)
from .prefill_attention import (
    prefill_attention,
    prefill_attention_numba,
    prefill_attention_reference,
)

__all__ = [
    "pack_slots",
    "pack_slots_numba",
    "pack_slots_reference",
    "paged_decode_attention",
    "paged_decode_attention_numba",
    "paged_decode_attention_reference",
    "prefill_attention",
    "prefill_attention_numba",
    "prefill_attention_reference",
    "unpack_slots",
    "unpack_slots_numba",
    "unpack_slots_reference",
]

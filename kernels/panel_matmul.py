"""Float32 products ``x @ W.T`` against a weight held in 64-column panels: a numba CPU kernel
and a torch reference.

A weight ``[N, K]`` (``N`` a multiple of 64) is packed once into panels ``[N / 64, K, 64]``:
panel ``p`` holds columns ``64p .. 64p + 63`` of ``W.T``, one 256-byte row per ``k``. The kernel
multiplies tiles of 6 rows of ``x`` (copied interleaved, ``[tiles, K, 6]``, so one tile's
inputs at each ``k`` sit together) by one panel: 24 vector sums of 16 columns in registers,
each a chain of fused multiply-adds in order of ``k``, so a row's result never depends on how
many other rows share the call. The ``k`` range goes in chunks of 128 (32 KiB of panel, kept
in L1 while every tile of a block of up to 96 rows passes over it), and while a chunk is in
use the tiles ask for the next one into L2 (``llvm.prefetch``), spread over their steps. That
prefetch is what a few rows need: a decode step's products stream the weights from memory,
and oneDNN's packed product (the engine's earlier float32 path) waits for each panel before
using it. On one core of an AVX-512 Xeon, a whole decode step's products of a 135M Llama
(30 layers and the LM head, 540 MB of float32 weights) took 0.67-0.85x oneDNN's time at 8-64
rows in best-of-3 runs (medians on a busier minute: 0.84-0.90x), and 0.97-1.06x at 128-1,024
rows (``results/README.md``).
"""

from __future__ import annotations

import numba
import numpy as np
import torch
import torch.nn.functional as F
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from .vector_code import LANES, VEC, Args, const, lanes_of, load_lanes, multiply_add, prefetch, splat

PANEL = 64                    # output columns of a panel: 4 vectors
ROWS = 6                      # rows of x per tile: 6 x 4 sums fill 24 of the 32 registers
K_CHUNK = 128                 # k steps per pass over a panel (32 KiB of it)
TILES_PER_BLOCK = 16          # tiles (96 rows) that pass over a chunk while it is cached
_VECTORS = PANEL // LANES
_LINE = 64                    # bytes of a cache line
_LINES_PER_STEP = PANEL * 4 // _LINE
_TO_L2 = 2


def can_pack(weight: torch.Tensor) -> bool:
    return (weight.device.type == "cpu" and weight.dtype == torch.float32 and weight.dim() == 2
            and weight.shape[0] % PANEL == 0 and weight.shape[0] > 0)


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` -> ``[N / 64, K, 64]`` (see :func:`can_pack`)."""
    out_features, in_features = weight.shape
    return weight.reshape(out_features // PANEL, PANEL, in_features).transpose(1, 2).contiguous()


def unpack_panels(panels: torch.Tensor) -> torch.Tensor:
    return panels.transpose(1, 2).reshape(-1, panels.shape[1])


def panel_matmul_reference(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    return F.linear(x, unpack_panels(panels))


@intrinsic
def _tile(typingctx, x_tiles, tile, panels, panel, out, rows, k0, k1, ahead, per_step):
    """``out[6 tile + r, 64 panel + j] (+)= sum_{k0 <= k < k1} x_tiles[tile, k, r] *
    panels[panel, k, j]`` for ``r < rows`` (added to ``out`` when ``k0 > 0``); each step also
    prefetches ``per_step`` cache lines, from line ``ahead`` on, of what follows ``panels[panel,
    k1]`` in memory."""
    sig = types.void(x_tiles, tile, panels, panel, out, rows, k0, k1, ahead, per_step)

    def codegen(context, builder, signature, args):
        a = Args(context, builder, signature, args, ("x_tiles", "tile", "panels", "panel", "out",
                                                     "rows", "k0", "k1", "ahead", "per_step"))
        sums = [[cgutils.alloca_once_value(builder, lanes_of(0.0)) for _ in range(_VECTORS)]
                for _ in range(ROWS)]
        first_row = builder.mul(a.tile, const(ROWS))
        column = builder.mul(a.panel, const(PANEL))
        out_rows = [builder.bitcast(a.pointer(a.out, builder.add(first_row, const(r)), column),
                                    VEC.as_pointer()) for r in range(ROWS)]

        def each_row(action):
            for r in range(ROWS):
                with builder.if_then(builder.icmp_signed("<", const(r), a.rows)):
                    action(r)

        with builder.if_then(builder.icmp_signed(">", a.k0, const(0))):
            each_row(lambda r: [builder.store(builder.load(builder.gep(out_rows[r], [const(v)]),
                                                           align=4), sums[r][v])
                                for v in range(_VECTORS)])
        x_base = a.pointer(a.x_tiles, a.tile, a.k0, const(0))
        panel_base = a.pointer(a.panels, a.panel, a.k0, const(0))
        next_lines = builder.gep(a.pointer(a.panels, a.panel, a.k1, const(0)),
                                 [builder.mul(a.ahead, const(_LINE // 4))])
        with cgutils.for_range(builder, builder.sub(a.k1, a.k0)) as step:
            first_line = builder.mul(step.index, a.per_step)
            with cgutils.for_range(builder, a.per_step) as line:
                offset = builder.mul(builder.add(first_line, line.index), const(_LINE // 4))
                prefetch(builder, builder.gep(next_lines, [offset]), _TO_L2)
            weights_row = builder.gep(panel_base, [builder.mul(step.index, const(PANEL))])
            weights = [load_lanes(builder, builder.gep(weights_row, [const(v * LANES)]),
                                  types.float32) for v in range(_VECTORS)]
            x_row = builder.gep(x_base, [builder.mul(step.index, const(ROWS))])
            for r in range(ROWS):
                x = splat(builder, builder.load(builder.gep(x_row, [const(r)])))
                for v in range(_VECTORS):
                    total = multiply_add(builder, x, weights[v], builder.load(sums[r][v]))
                    builder.store(total, sums[r][v])
        each_row(lambda r: [builder.store(builder.load(sums[r][v]),
                                          builder.gep(out_rows[r], [const(v)]), align=4)
                            for v in range(_VECTORS)])
        return context.get_dummy_value()

    return sig, codegen


@numba.njit(cache=True, fastmath=False)
def _interleave(x, x_tiles):
    """``x_tiles[t, k, r] = x[6 t + r, k]``, 0 past the last row."""
    for t in range(x_tiles.shape[0]):
        for k in range(x.shape[1]):
            for r in range(ROWS):
                m = t * ROWS + r
                x_tiles[t, k, r] = x[m, k] if m < x.shape[0] else np.float32(0.0)


@numba.njit(cache=True, fastmath=False)
def _panel_kernel(x, x_tiles, panels, out):
    rows, depth = x.shape
    tiles, count = x_tiles.shape[0], panels.shape[0]
    _interleave(x, x_tiles)
    for t0 in range(0, tiles, TILES_PER_BLOCK):
        t1 = min(t0 + TILES_PER_BLOCK, tiles)
        for panel in range(count):
            for k0 in range(0, depth, K_CHUNK):
                k1 = min(k0 + K_CHUNK, depth)
                # the next chunk in memory: this panel's next k range, or the next panel's first
                last = panel == count - 1 and k1 == depth
                following = min(K_CHUNK, depth if k1 == depth else depth - k1)
                lines = 0 if last else following * _LINES_PER_STEP
                steps = (t1 - t0) * (k1 - k0)
                per_step = (lines + steps - 1) // steps
                for t in range(t0, t1):
                    ahead = (t - t0) * (k1 - k0) * per_step
                    _tile(x_tiles, t, panels, panel, out, min(ROWS, rows - t * ROWS), k0, k1,
                          ahead, per_step if ahead < lines else 0)


def panel_matmul(x: torch.Tensor, panels: torch.Tensor) -> torch.Tensor:
    """``x [M, K] @ W.T`` for the float32 CPU weight ``W`` packed by :func:`pack_panels`;
    returns float32 ``[M, N]``."""
    rows, depth = x.shape
    out = torch.empty(rows, panels.shape[0] * PANEL, dtype=torch.float32)
    if rows == 0:
        return out
    x_tiles = np.empty(((rows + ROWS - 1) // ROWS, depth, ROWS), dtype=np.float32)
    _panel_kernel(x.float().contiguous().numpy(), x_tiles, panels.numpy(), out.numpy())
    return out

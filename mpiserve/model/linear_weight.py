"""Linear-layer weights held in the layout the device's fastest product wants.

On a CPU, torch's `F.linear` re-reads the plain `[out, in]` weight each call; oneDNN can
instead reorder the weight once, at load, into its blocked layout. Measured on one core with
the products of a whole decode step of a 135M Llama (30 layers' qkv, o, gate_up and down, each
with its own weight, then the LM head):
- float32 on AVX2: the packed product takes 0.48x the time of `F.linear` at 4 rows, 0.66x at 16,
  0.82x at 64, the same at 256 rows and 1.03x at 1024;
- bfloat16 on AMX: 26.5 against 40.9 ms at 4 rows (0.65x), 27.7 against 39.1 at 16, 35.6
  against 53.5 at 64 and 67.9 against 95.0 at 256; the packed step reads its weights at the
  machine's streaming rate from 1 to 16 rows;
- float16 (no AMX-FP16 there): 0.72x at 4 rows, 0.96x at 64, the same at 256.
So CPU weights in those dtypes are packed when oneDNN is there and (for half precision) says it
supports the dtype; everything else (GPU, a torch built without oneDNN) keeps the plain weight
and `F.linear`.

Float32 CPU weights with a multiple of 64 outputs go further, on a single torch thread: they
are held in the panels of `kernels.panel_matmul`, whose kernel prefetches the weights it is
about to use. On an AVX-512 Xeon without AMX, a decode step's products took 0.67-0.85x
oneDNN's packed time at 8-64 rows (best of 3; medians 0.84-0.90x) and 0.97-1.06x from 128
rows on. The kernel is single-threaded, so with more torch threads the weights stay with
oneDNN. Its tiles are cut for AVX-512 (6 x 4 sums of 16 floats in 32 registers): on an
AVX2-only EPYC (16 registers of 8 floats) the same products took 1.0-1.4x oneDNN's time at
1-12 rows and 1.6-2.5x from 16 rows on, so there the weights stay with oneDNN too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mpiserve import cpu_features
from mpiserve.kernels import panel_matmul

_AVX512 = cpu_features.has_avx512()     # a fact of the CPU: every engine of a host chooses alike

_PACK_ROWS_HINT = 16     # oneDNN's reorder takes an expected row count; measured not to matter


def _onednn_packs(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    supported = {torch.float32: lambda: True,
                 torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                 torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype)
    return supported is not None and bool(supported())


def for_linear(weight: torch.Tensor) -> torch.Tensor:
    """The weight `[out, in]` as `linear` multiplies it fastest on its device: float32 panels
    `[out / 64, in, 64]` (3-D), a oneDNN tensor, or the weight itself."""
    if panel_matmul.can_pack(weight) and torch.get_num_threads() == 1 and _AVX512:
        return panel_matmul.pack_panels(weight)
    if weight.device.type != "cpu" or not _onednn_packs(weight.dtype):
        return weight
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _PACK_ROWS_HINT)
    except (RuntimeError, AttributeError):     # an op missing from this torch build
        return weight


def weight_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(out, in) of a weight as `for_linear` holds it."""
    if weight.dim() == 3:
        return weight.shape[0] * weight.shape[2], weight.shape[1]
    return tuple(weight.shape)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """`x @ weight.T + bias` in the weight's dtype, returned in `x`'s dtype (see
    `matmul_dtype`: the weights of a half-precision model may be held widened)."""
    wide = x.to(weight.dtype)
    if weight.dim() == 3:
        out = panel_matmul.panel_matmul(wide.reshape(-1, wide.shape[-1]), weight)
        out = out.reshape(*wide.shape[:-1], out.shape[-1])
        if bias is not None:
            out += bias
    elif weight.is_mkldnn:
        out = torch.ops.mkldnn._linear_pointwise(wide.contiguous(), weight, bias, "none", [], "")
    else:
        out = F.linear(wide, weight, bias)
    return out.to(x.dtype)

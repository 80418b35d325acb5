"""Checks the numba-cuda decode kernel against the torch reference under the CUDA simulator.

Run as ``python tests/cuda_sim_decode.py`` (by tests/test_paged_attention_cuda.py): the
simulator must be switched on before numba.cuda is first imported, so this runs in its own
process. Prints one line per case and exits non-zero on the first mismatch.
"""

import os

os.environ["NUMBA_ENABLE_CUDASIM"] = "1"

import torch  # noqa: E402

from mpiserve.kernels.paged_attention import paged_decode_attention_reference  # noqa: E402
from mpiserve.kernels.paged_attention_cuda import paged_decode_attention_cuda  # noqa: E402

# (heads, kv_heads): GQA and MHA; page size 4 with lengths on (4, 8) and off (1, 5, 11)
# page boundaries; page tables are 4 wide, so shorter sequences leave unused tail entries
# (filled with an out-of-range id that must never be read)
_CASES = {"gqa": (4, 2, [5, 8, 1]), "mha": (2, 2, [4, 11])}
_TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _case(heads, kv_heads, lens, dtype, generator):
    num_pages, page_size, dim = 12, 4, 8
    kv = torch.randn(2, num_pages, page_size, kv_heads, dim, generator=generator).to(dtype)
    q = torch.randn(len(lens), heads, dim, generator=generator).to(dtype)
    table = torch.full((len(lens), 4), num_pages + 100, dtype=torch.int32)
    order = torch.randperm(num_pages, generator=generator)
    for b, length in enumerate(lens):
        used = (length + page_size - 1) // page_size
        table[b, :used] = order[4 * b:4 * b + used]
    return q, kv, table, torch.tensor(lens, dtype=torch.int32)


def main():
    generator = torch.Generator().manual_seed(0)
    for name, (heads, kv_heads, lens) in _CASES.items():
        for dtype, tolerance in _TOLERANCE.items():
            q, kv, table, lens_t = _case(heads, kv_heads, lens, dtype, generator)
            got = paged_decode_attention_cuda(q, kv, table, lens_t, 0.35)
            want = paged_decode_attention_reference(q, kv, table, lens_t, 0.35)
            assert got.dtype == dtype, got.dtype
            error = (got.float() - want.float()).abs().max().item()
            print(f"{name} {dtype} max_abs_error={error:.3g}", flush=True)
            assert error <= tolerance, f"{name} {dtype}: error {error} > {tolerance}"


if __name__ == "__main__":
    main()

"""The numba-cuda decode kernels compile for a real GPU target (PTX for sm_90), no GPU needed.

The simulator test runs the kernel's Python; this one puts the same source through
numba-cuda's CUDA compiler, which rejects what the simulator accepts (an import statement in
a device function, for one). Needs NVVM and NVRTC (``pip install 'numba-cuda[cu12]'``); skips
naming what is missing otherwise. Without a GPU, numba-cuda cannot ask the driver for the
compute capability that device functions are compiled for, so the test gives it.
"""

import types as pytypes

import pytest
import torch

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (extra 'gpu'/'test')")

from cuda.pathfinder import DynamicLibNotFoundError  # noqa: E402
from numba import cuda, types  # noqa: E402
from numba.cuda import dispatcher  # noqa: E402
from numba.cuda.cudadrv.error import NvrtcSupportError, NvvmSupportError  # noqa: E402

from mpiserve.kernels import paged_attention_cuda  # noqa: E402

TARGET = (9, 0)
_STORED = {torch.float32: types.float32, torch.float16: types.float16,
           torch.bfloat16: types.int16}


@pytest.fixture
def target_device(monkeypatch):
    """Compile device functions for ``TARGET``; skip where the CUDA compilers are missing."""
    if not torch.cuda.is_available():
        monkeypatch.setattr(dispatcher, "get_current_device",
                            lambda: pytypes.SimpleNamespace(compute_capability=TARGET))
    try:
        cuda.compile_ptx(_store_one, (types.float32[::1],), cc=TARGET)
    except (DynamicLibNotFoundError, NvrtcSupportError, NvvmSupportError) as error:
        pytest.skip(f"no CUDA compiler libraries here: {error}")


def _store_one(a):
    a[0] = 1.0


@pytest.mark.parametrize("dtype", list(_STORED), ids=str)
def test_kernel_compiles_to_ptx(dtype, target_device):
    sig = (types.float32[:, :, ::1], _STORED[dtype][:, :, :, :, ::1], types.int32[:, ::1],
           types.int32[::1], types.float32, types.float32[:, :, ::1])
    ptx, _ = cuda.compile_ptx(paged_attention_cuda._kernel(dtype).py_func, sig, cc=TARGET)
    assert ".entry" in ptx
    assert "bar.sync" in ptx  # the block reductions synchronise the threads

"""An engine compiles its kernels while it loads, not inside the first request."""

import subprocess
import sys

import pytest

PROBE = """
import sys
from mpiserve.kernels import paged_attention, kv_pack
from mpiserve import LLM
assert not paged_attention._decode_kernel.signatures, "compiled before the engine"
LLM(sys.argv[1], dtype=sys.argv[2], page_size=4, num_pages=8)
print(len(paged_attention._decode_kernel.signatures), len(kv_pack._unpack_kernel.signatures))
"""


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_loading_an_engine_compiles_its_kernels(tiny_hf_model, dtype):
    """A fresh process: no kernel is compiled until an engine loads; after loading, the decode
    attention and KV unpack kernels of the engine's dtype are ready."""
    model_dir = tiny_hf_model("llama")
    done = subprocess.run([sys.executable, "-c", PROBE, str(model_dir), dtype],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    decode, unpack = map(int, done.stdout.split())
    assert decode >= 1 and unpack >= 1

"""The numba-cuda paged decode attention, run on CPU by numba's CUDA simulator.

The simulator is enabled by an environment variable read when numba.cuda is first imported,
so the check runs in a child process and leaves this pytest process untouched.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (extra 'gpu'/'test')")

_SCRIPT = Path(__file__).with_name("cuda_sim_decode.py")


def test_cuda_kernel_matches_reference_in_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    done = subprocess.run([sys.executable, str(_SCRIPT)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 6, done.stdout
    for dtype in ("float32", "float16", "bfloat16"):
        assert any(dtype in line for line in lines), done.stdout

"""engine.heap_reuse: with the settings applied, a block of megabytes (a step's activation)
comes from the process heap and stays there once freed, ready for the next step; without
them, glibc maps it fresh and unmaps it on free."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROGRAM = """
import json, sys
import torch
from mpiserve.engine.heap_reuse import keep_freed_memory

def heap_bytes():
    for line in open("/proc/self/maps"):
        if line.rstrip().endswith("[heap]"):
            start, end = (int(x, 16) for x in line.split()[0].split("-"))
            return end - start
    return 0

applied = keep_freed_memory() if sys.argv[1] == "on" else None
before = heap_bytes()
block = torch.empty(5 * 2**20, dtype=torch.float32).fill_(1.0)     # 20 MiB
holding = heap_bytes()
del block
print(json.dumps({"applied": applied, "grew": holding - before,
                  "kept": heap_bytes() - before}))
"""
BLOCK = 20 * 2**20


def heap_growth(mode: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_activations_come_from_the_heap_and_stay_there():
    plain, kept = heap_growth("off"), heap_growth("on")
    assert plain["applied"] is None and plain["grew"] < BLOCK    # mapped apart, unmapped
    assert kept["applied"] is True
    # (the heap may already hold part of it free)
    assert kept["grew"] > BLOCK // 2 and kept["kept"] == kept["grew"]

"""Smoke test of `python -m mpiserve.bench.kernels`: every section runs on shrunken shapes and
writes one well-formed row per case (no timing assertions). The bench once crashed at its
first row for three sessions without a test noticing."""

import json

import pytest
import torch

from mpiserve.bench import kernels


@pytest.fixture
def small_shapes(monkeypatch):
    threads = torch.get_num_threads()           # main() sets one thread: put it back after
    for name, value in {"DECODE_BATCHES": (2,), "DECODE_CONTEXTS": (40,),
                        "DECODE_STEP_BATCH": 2, "DECODE_STEP_CONTEXTS": (40,),
                        "DECODE_STEP_LAYERS": 2, "PREFILL_CHUNKS": ((16, 48),),
                        "LINEAR_ROWS": (3,), "LINEAR_LAYERS": 1, "LINEAR_HEAD": (128, 576),
                        "PACK_TOKENS": (32,), "PACK_POOL_PAGES": 8}.items():
        monkeypatch.setattr(kernels, name, value)
    yield
    torch.set_num_threads(threads)


def test_every_section_writes_its_rows(tmp_path, small_shapes):
    kernels.main(["--out", str(tmp_path)])
    rows = json.loads((tmp_path / "kernels.json").read_text())
    counts = {}
    for r in rows:
        counts[r["kernel"]] = counts.get(r["kernel"], 0) + 1
        assert r["reference_us"] > 0 and r["numba_us"] > 0
        assert r["speedup"] == pytest.approx(r["reference_us"] / r["numba_us"], rel=0.02)
    # decode: 3 dtypes x 2 head layouts; decode_step and prefill: 2 dtypes; pack/unpack:
    # 2 dtypes x 2 layouts
    assert counts == {"decode_attention": 6, "decode_step": 2, "prefill_attention": 2,
                      "linear_step": 1, "pack_slots": 4, "unpack_slots": 4}
    table = (tmp_path / "kernels.md").read_text()
    assert "| decode_step | batch=2 layers=2 context=40" in table

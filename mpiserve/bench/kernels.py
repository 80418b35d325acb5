"""Time the torch references against the numba kernels of ``mpiserve.kernels``.

    python -m mpiserve.bench.kernels [--out results]

One torch thread, single-threaded numba. Each timing is the median of repeats after a
warm-up, the two implementations called in turn. The ``decode_step`` rows time decode
attention over SmolLM2's 30 layers, each layer's K/V a pool of its own (1.1 GB of float32 at
1,000 tokens of context for 24 sequences: read from memory, as in serving). The
``linear_step`` rows time all the float32 products of one step of SmolLM2-135M's shapes (30
layers and the LM head, random weights): oneDNN's packed weights (the reference column)
against ``kernels.panel_matmul``. Writes ``kernels.json`` (one row per case) and
``kernels.md`` (a table and the command) to the output directory.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import numba
import torch

from mpiserve.bench.report_files import write_report
from mpiserve.kernels import (
    pack_slots_numba,
    pack_slots_reference,
    paged_decode_attention_numba,
    paged_decode_attention_reference,
    panel_matmul,
    prefill_attention_numba,
    prefill_attention_reference,
    unpack_slots_numba,
    unpack_slots_reference,
)

PAGE_SIZE = 16
DECODE_BATCHES = (1, 8, 32)
DECODE_CONTEXTS = (128, 512, 2048)
DECODE_HEADS = ((8, 4), (8, 2))  # (query heads, kv heads), head_dim 64
DECODE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PREFILL_CHUNKS = ((64, 64), (256, 256), (1024, 1024), (256, 1024))   # (queries, context)
SMOLLM2_HEADS = (9, 3)  # SmolLM2-135M's query and kv heads, head_dim 64
# a whole decode step's attention: SmolLM2's 30 layers, each with its own pool, so that the
# K/V come from memory rather than cache, as in a serving step
DECODE_STEP_BATCH, DECODE_STEP_CONTEXTS, DECODE_STEP_LAYERS = 24, (300, 1000), 30
LINEAR_ROWS = (1, 8, 16, 32, 64, 256, 1024)
# SmolLM2-135M: (out, in) of qkv, o, gate_up and down, 30 layers, and the tied LM head
LINEAR_LAYER_SHAPES = ((960, 576), (576, 576), (3072, 576), (576, 1536))
LINEAR_LAYERS, LINEAR_HEAD = 30, (49152, 576)
PACK_TOKENS = (64, 256, 1024, 2048)
PACK_SHAPE = (8, 128)  # kv heads, head_dim of one Llama-3-8B layer
PACK_POOL_PAGES = 1024


def time_pair_us(reference, numba_fn, args: tuple, min_seconds: float = 0.4,
                 min_repeats: int = 5) -> tuple[float, float]:
    """Median wall times of ``reference(*args)`` and ``numba_fn(*args)`` in microseconds.

    Calls alternate after a warm-up, so that load from other processes on the machine
    falls on both sides alike.
    """
    fns = (reference, numba_fn)
    for fn in fns * 3:
        fn(*args)
    samples: tuple[list[float], list[float]] = ([], [])
    deadline = time.perf_counter() + min_seconds
    while len(samples[0]) < min_repeats or time.perf_counter() < deadline:
        for fn, times in zip(fns, samples, strict=True):
            start = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - start)
    reference_us, numba_us = (statistics.median(times) * 1e6 for times in samples)
    return reference_us, numba_us


def row(kernel: str, shape: dict, reference, numba_fn, args: tuple) -> dict:
    reference_us, numba_us = time_pair_us(reference, numba_fn, args)
    return {"kernel": kernel, **shape, "reference_us": round(reference_us, 1),
            "numba_us": round(numba_us, 1), "speedup": round(reference_us / numba_us, 2)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def decode_rows() -> list[dict]:
    rows = []
    for dtype in DECODE_DTYPES:
        for heads, kv_heads in DECODE_HEADS:
            for batch in DECODE_BATCHES:
                for context in DECODE_CONTEXTS:
                    args = decode_inputs(batch, context, heads, kv_heads, 64, dtype)
                    shape = {"batch": batch, "context": context, "heads": heads,
                             "kv_heads": kv_heads, "head_dim": 64, "page_size": PAGE_SIZE,
                             "dtype": dtype_name(dtype)}
                    rows.append(row("decode_attention", shape,
                                    paged_decode_attention_reference,
                                    paged_decode_attention_numba, args))
                    print_row(rows[-1])
    return rows


def decode_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int,
                  dtype: torch.dtype):
    """Random inputs; every sequence holds ``context`` tokens on shuffled pages."""
    pages_per_seq = -(-context // PAGE_SIZE)
    num_pages = batch * pages_per_seq
    kv = torch.randn(2, num_pages, PAGE_SIZE, kv_heads, head_dim).to(dtype)
    page_table = torch.randperm(num_pages).view(batch, pages_per_seq).to(torch.int32)
    context_lens = torch.full((batch,), context, dtype=torch.int32)
    q = torch.randn(batch, heads, head_dim).to(dtype)
    return q, kv, page_table, context_lens, head_dim ** -0.5


def decode_step_rows() -> list[dict]:
    rows = []
    heads, kv_heads = SMOLLM2_HEADS
    for dtype in (torch.float32, torch.bfloat16):
        for context in DECODE_STEP_CONTEXTS:
            layers = [decode_inputs(DECODE_STEP_BATCH, context, heads, kv_heads, 64, dtype)
                      for _ in range(DECODE_STEP_LAYERS)]
            shape = {"batch": DECODE_STEP_BATCH, "context": context,
                     "layers": DECODE_STEP_LAYERS, "heads": heads, "kv_heads": kv_heads,
                     "head_dim": 64, "page_size": PAGE_SIZE, "dtype": dtype_name(dtype)}
            rows.append(row("decode_step", shape, every_layer(paged_decode_attention_reference),
                            every_layer(paged_decode_attention_numba), (layers,)))
            print_row(rows[-1])
            del layers
    return rows


def every_layer(attention):
    def step(layers):
        for args in layers:
            attention(*args)
    return step


def prefill_rows() -> list[dict]:
    """Whole prompts, and a chunk at the end of earlier context, causal."""
    rows = []
    heads, kv_heads = SMOLLM2_HEADS
    for dtype in (torch.float32, torch.bfloat16):
        for length, context in PREFILL_CHUNKS:
            keys, values = (torch.randn(context, kv_heads, 64).to(dtype) for _ in "kv")
            args = (torch.randn(length, heads, 64).to(dtype), keys, values,
                    torch.randperm(context), 64 ** -0.5)
            shape = {"length": length, "context": context, "heads": heads,
                     "kv_heads": kv_heads, "head_dim": 64, "dtype": dtype_name(dtype)}
            rows.append(row("prefill_attention", shape, prefill_attention_reference,
                            prefill_attention_numba, args))
            print_row(rows[-1])
    return rows


def linear_rows() -> list[dict]:
    shapes = [*LINEAR_LAYER_SHAPES * LINEAR_LAYERS, LINEAR_HEAD]
    weights = [torch.randn(out, inner) * inner ** -0.5 for out, inner in shapes]
    onednn = [torch.ops.mkldnn._reorder_linear_weight(w, 16) for w in weights]
    panels = [panel_matmul.pack_panels(w) for w in weights]
    del weights

    def step(xs, packed, product):
        for w, (_, inner) in zip(packed, shapes):
            product(xs[inner], w)

    def onednn_step(xs):
        step(xs, onednn, lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none",
                                                                         [], ""))

    def panel_step(xs):
        step(xs, panels, panel_matmul.panel_matmul)

    rows = []
    for count in LINEAR_ROWS:
        xs = {inner: torch.randn(count, inner) for inner in {i for _, i in shapes}}
        shape = {"rows": count, "layers": LINEAR_LAYERS, "dtype": "float32"}
        rows.append(row("linear_step", shape, onednn_step, panel_step, (xs,)))
        print_row(rows[-1])
    return rows


def pack_rows() -> list[dict]:
    rows = []
    kv_heads, head_dim = PACK_SHAPE
    for dtype in (torch.float32, torch.bfloat16):
        kv = torch.randn(2, PACK_POOL_PAGES, PAGE_SIZE, kv_heads, head_dim).to(dtype)
        for layout in ("whole pages", "scattered"):
            for tokens in PACK_TOKENS:
                slots = pick_slots(tokens, layout)
                buf = pack_slots_reference(kv, slots)
                shape = {"tokens": tokens, "slots": layout, "kv_heads": kv_heads,
                         "head_dim": head_dim, "page_size": PAGE_SIZE,
                         "dtype": dtype_name(dtype)}
                rows.append(row("pack_slots", shape, pack_slots_reference, pack_slots_numba,
                                (kv, slots)))
                print_row(rows[-1])
                rows.append(row("unpack_slots", shape, unpack_slots_reference,
                                unpack_slots_numba, (kv, slots, buf)))
                print_row(rows[-1])
    return rows


def pick_slots(tokens: int, layout: str) -> torch.Tensor:
    """``tokens`` slots of the pool: whole pages in shuffled order, or random single slots."""
    if layout == "scattered":
        return torch.randperm(PACK_POOL_PAGES * PAGE_SIZE)[:tokens]
    pages = torch.randperm(PACK_POOL_PAGES)[:tokens // PAGE_SIZE]
    return (pages[:, None] * PAGE_SIZE + torch.arange(PAGE_SIZE)).flatten()


SHAPE_KEYS = ("batch", "rows", "layers", "length", "context", "heads", "kv_heads", "tokens",
              "slots", "head_dim", "page_size", "dtype")


def shape_text(r: dict) -> str:
    return " ".join(f"{key}={r[key]}" for key in SHAPE_KEYS if key in r)


def print_row(r: dict) -> None:
    print(f"{r['kernel']:<17} {shape_text(r):<72} ref {r['reference_us']:>9.1f} us  "
          f"numba {r['numba_us']:>9.1f} us  x{r['speedup']:.2f}", flush=True)


def markdown(rows: list[dict], command: str, start_load: float) -> str:
    lines = [
        "# Kernel benchmark: torch reference vs numba",
        "",
        f"Command: `{command}`",
        "",
        f"torch {torch.__version__} ({torch.get_num_threads()} thread), numba "
        f"{numba.__version__}, {platform.machine()} with {os.cpu_count()} cores, load average "
        f"{start_load:.1f} at the start and {os.getloadavg()[0]:.1f} at the end; median of "
        "alternating repeats after warm-up.",
        "",
        "| kernel | shape | reference (us) | numba (us) | speedup |",
        "|---|---|---:|---:|---:|",
    ]
    lines += [f"| {r['kernel']} | {shape_text(r)} | {r['reference_us']:.1f} | "
              f"{r['numba_us']:.1f} | {r['speedup']:.2f} |" for r in rows]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="results", help="output directory")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start_load = os.getloadavg()[0]
    rows = decode_rows() + decode_step_rows() + prefill_rows() + linear_rows() + pack_rows()
    command = " ".join(["python -m mpiserve.bench.kernels", *argv])
    path = write_report(args.out, "kernels", rows, markdown(rows, command, start_load))
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()

"""What a step costs on the host: mpiserve's engine against transformers' `generate` on a
Llama whose arithmetic is negligible (2 layers, hidden 64), so that their times are the
Python, dispatch and bookkeeping paid per step. On a GPU that work, not the kernels, bounds
a small model (the first GPU check: mpiserve 0.33x transformers). CPU, float32, one thread;
the two alternate over the repeats, and the minimum and median of each are written.

    python -m mpiserve.bench.host_overhead [--repeats 7] [--out results]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ..option_types import whole_number
from .bench_model import ModelShape, write_model
from .engine_throughput import NO_EOS
from .gpu_check import engine_generate, seeded_prompts, transformers_generate
from .report_files import write_report

SHAPE = ModelShape("host-overhead-llama", vocab_size=2048, hidden_size=64,
                   intermediate_size=128, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=2048)
PROMPTS, PROMPT_LEN, NEW_TOKENS = 32, 64, 128


def measure(repeats: int) -> dict:
    torch.set_num_threads(1)
    prompts = seeded_prompts(PROMPTS, PROMPT_LEN, SHAPE.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), SHAPE, **NO_EOS)
        runs = {"mpiserve": engine_generate(Path(tmp), "cpu", prompts, NEW_TOKENS, "float32"),
                "transformers": transformers_generate(Path(tmp), "cpu", prompts, NEW_TOKENS,
                                                      torch.float32)}
        outputs = {name: generate() for name, generate in runs.items()}      # warm-up
        seconds = {name: [] for name in runs}
        for _ in range(repeats):
            for name, generate in runs.items():
                start = time.perf_counter()
                generate()
                seconds[name].append(time.perf_counter() - start)
    result = {"model": SHAPE.describe(), "prompts": PROMPTS, "prompt_len": PROMPT_LEN,
              "new_tokens": NEW_TOKENS, "repeats": repeats, "dtype": "float32", "threads": 1,
              "identical_outputs": sum(a == b for a, b in zip(*outputs.values()))}
    for name, times in seconds.items():
        result[name] = {"min_s": min(times), "median_s": statistics.median(times),
                        "seconds": times}
    result["ratio_of_minimums"] = result["transformers"]["min_s"] / result["mpiserve"]["min_s"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=whole_number(1), default=7)
    parser.add_argument("--out", default="results")
    args = parser.parse_args(argv)
    result = measure(args.repeats)
    write_report(args.out, "host_overhead", result)
    print(f"host_overhead: mpiserve min {result['mpiserve']['min_s']:.3f} s (median "
          f"{result['mpiserve']['median_s']:.3f}), transformers min "
          f"{result['transformers']['min_s']:.3f} s (median "
          f"{result['transformers']['median_s']:.3f}); transformers / mpiserve "
          f"{result['ratio_of_minimums']:.2f}; identical outputs "
          f"{result['identical_outputs']}/{PROMPTS}")


if __name__ == "__main__":
    main()

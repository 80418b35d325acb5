"""Where an engine step spends its time, and how close prefill runs to the matmul roofline.

    python -m mpiserve.bench.step_profile [--model DIR] [--dtypes float32,bfloat16] [--quick]
                                          [--out results]

For each dtype, on one torch thread:

* a prefill-heavy pass (prompts of `prompt_len` tokens, one new token each) and a decode-heavy
  pass (short prompts, many new tokens) run under torch.profiler; the top operators by self
  time and their shares are reported, with the time outside torch (numba kernels, Python);
* prefill's achieved model FLOP/s (the linear layers of every prompt token, attention over the
  causal context, the LM head of the sampled rows) against the FLOP/s of a single-thread
  product of the model's own weight shapes with as many rows as a step holds: float32
  ``F.linear``, and the engine's own product (its matmul dtype, its packed weights).

Writes ``step_profile.json`` and ``step_profile.md`` to the output directory.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from mpiserve import LLM, SamplingParams
from mpiserve.bench.bench_model import BENCH, QUICK, bench_model_dir
from mpiserve.bench.report_files import write_report
from mpiserve.model.linear_weight import for_linear, linear, weight_shape

SEED = 7
TOP_OPS = 8


@dataclass(frozen=True)
class Passes:
    prefill_prompts: int
    prompt_len: int
    decode_prompts: int
    decode_tokens: int


FULL = Passes(prefill_prompts=8, prompt_len=1024, decode_prompts=16, decode_tokens=48)
SMALL = Passes(prefill_prompts=2, prompt_len=64, decode_prompts=2, decode_tokens=4)
ENGINE_OPTIONS = {"kv_cache_gib": 1.0, "max_batch_tokens": 1024, "torch_threads": 1,
                  "device": "cpu"}


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def random_prompts(count: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """Fresh token ids per seed, so no pass hits the prefix cache of another."""
    rng = random.Random(seed)
    return [[rng.randrange(5, vocab) for _ in range(length)] for _ in range(count)]


def linear_shapes(llm: LLM) -> list[tuple[int, int]]:
    """(out, in) of every weight one prompt token multiplies, once per layer."""
    layer = llm.engine.model.layers[0]
    shapes = [weight_shape(w) for w in (layer.qkv, layer.o, layer.gate_up, layer.down)]
    return shapes * len(llm.engine.model.layers)


def prefill_flops(llm: LLM, passes: Passes) -> float:
    c = llm.engine.model_config
    per_token = sum(2 * out * inp for out, inp in linear_shapes(llm))
    n = passes.prompt_len
    causal_pairs = n * (n + 1) / 2                     # (query, key) pairs of one prompt
    attention = 4 * c.head_dim * c.num_heads * c.num_layers * causal_pairs
    lm_head = 2 * c.hidden_size * c.vocab_size
    return passes.prefill_prompts * (n * per_token + attention + lm_head)


def matmul_flops_per_s(llm: LLM, rows: int, engine_product: bool = False) -> float:
    """FLOP/s of each distinct weight shape times `rows` rows, FLOP-weighted: float32
    F.linear, or (`engine_product`) the engine's own product in its matmul dtype."""
    dtype = llm.engine.matmul_dtype if engine_product else torch.float32
    total_flops = total_s = 0.0
    for out, inp in sorted(set(linear_shapes(llm))):
        x, w = torch.randn(rows, inp, dtype=dtype), torch.randn(out, inp, dtype=dtype)
        if engine_product:
            w = for_linear(w)
        product = (lambda: linear(x, w)) if engine_product else (lambda: F.linear(x, w))
        product()
        best = min(_seconds(product) for _ in range(3))
        total_flops += 2 * rows * out * inp
        total_s += best
    return total_flops / total_s


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def profiled(llm: LLM, prompts, params) -> tuple[float, list[dict], float]:
    """Wall seconds, the top operators by self CPU time, and the share of wall time outside
    torch operators (numba kernels, Python bookkeeping)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = _seconds(lambda: llm.generate(prompts, params, progress=False))
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    in_torch = sum(e.self_cpu_time_total for e in events) / 1e6
    top = [{"op": e.key, "calls": e.count, "seconds": round(e.self_cpu_time_total / 1e6, 3),
            "share": round(e.self_cpu_time_total / 1e6 / wall, 3)} for e in events[:TOP_OPS]]
    return wall, top, max(0.0, 1 - in_torch / wall)


def measure(model_dir: str, dtype: str, passes: Passes) -> dict:
    llm = LLM(model_dir, dtype=dtype, **ENGINE_OPTIONS)
    vocab = min(llm.engine.model_config.vocab_size, 2000)
    prefill = random_prompts(passes.prefill_prompts, passes.prompt_len, vocab, SEED)
    decode = random_prompts(passes.decode_prompts, 32, vocab, SEED + 1)
    wall, prefill_top, prefill_outside = profiled(llm, prefill, greedy(1))
    unprofiled = random_prompts(passes.prefill_prompts, passes.prompt_len, vocab, SEED + 2)
    plain_wall = _seconds(lambda: llm.generate(unprofiled, greedy(1), progress=False))
    decode_wall, decode_top, decode_outside = profiled(llm, decode, greedy(passes.decode_tokens))
    achieved = prefill_flops(llm, passes) / plain_wall
    rows = ENGINE_OPTIONS["max_batch_tokens"]
    roofline = matmul_flops_per_s(llm, rows)
    own_roofline = matmul_flops_per_s(llm, rows, engine_product=True)
    return {"dtype": dtype, "matmul_dtype": str(llm.engine.matmul_dtype).removeprefix("torch."),
            "prefill": {"seconds": round(plain_wall, 3), "profiled_seconds": round(wall, 3),
                        "tokens": passes.prefill_prompts * passes.prompt_len,
                        "achieved_gflops": round(achieved / 1e9, 1),
                        "top_ops": prefill_top, "outside_torch_share": round(prefill_outside, 3)},
            "decode": {"seconds": round(decode_wall, 3),
                       "tokens": passes.decode_prompts * passes.decode_tokens,
                       "top_ops": decode_top, "outside_torch_share": round(decode_outside, 3)},
            "fp32_matmul_gflops_of_model_shapes": round(roofline / 1e9, 1),
            "prefill_share_of_matmul_roofline": round(achieved / roofline, 3),
            "engine_matmul_gflops_of_model_shapes": round(own_roofline / 1e9, 1),
            "prefill_share_of_engine_matmul": round(achieved / own_roofline, 3)}


def markdown(report: dict) -> str:
    lines = [f"# Engine step profile\n\n`{report['command']}`\n\nModel: {report['model']}; "
             f"{report['passes']}\n"]
    for r in report["runs"]:
        p = r["prefill"]
        lines.append(f"## {r['dtype']} (linear layers multiply in {r['matmul_dtype']})\n\n"
                     f"Prefill: {p['tokens']} tokens in {p['seconds']} s, "
                     f"**{p['achieved_gflops']} GFLOP/s** achieved vs "
                     f"{r['fp32_matmul_gflops_of_model_shapes']} GFLOP/s for a float32 "
                     f"F.linear of the model's shapes "
                     f"({r['prefill_share_of_matmul_roofline']:.0%}) and "
                     f"{r['engine_matmul_gflops_of_model_shapes']} GFLOP/s for the engine's "
                     f"own {r['matmul_dtype']} product of them "
                     f"({r['prefill_share_of_engine_matmul']:.0%})."
                     f" Decode: {r['decode']['tokens']} tokens in {r['decode']['seconds']} s.\n")
        for name in ("prefill", "decode"):
            lines.append(f"| {name}: operator | calls | self s | share of wall |\n"
                         "|---|---:|---:|---:|")
            for op in r[name]["top_ops"]:
                lines.append(f"| `{op['op']}` | {op['calls']} | {op['seconds']} | "
                             f"{op['share']:.0%} |")
            lines.append(f"| outside torch ops (numba kernels, Python) | | | "
                         f"{r[name]['outside_torch_share']:.0%} |\n")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpiserve.bench.step_profile",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="checkpoint directory (default: the benchmark model)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default="results")
    parser.add_argument("--quick", action="store_true", help="tiny model and passes (smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    passes = SMALL if args.quick else FULL
    model_dir = args.model or str(bench_model_dir(QUICK if args.quick else BENCH))
    report = {"command": "python -m mpiserve.bench.step_profile " + " ".join(
                  argv if argv is not None else sys.argv[1:]),
              "model": args.model or ("bench model " + (QUICK if args.quick else BENCH).name),
              "passes": str(passes), "quick": args.quick,
              "runs": [measure(model_dir, dtype, passes) for dtype in args.dtypes.split(",")]}
    write_report(args.out, "step_profile", report, markdown(report), indent=2)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())

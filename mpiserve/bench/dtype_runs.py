"""mpiserve against vLLM's CPU backend per dtype, and first-request time to first token.

Used by ``mpiserve.bench.engine_throughput``: the same prompts (token ids) and ``max_tokens``
go to both engines; per dtype the report holds both engines' tokens/s, the ratio
mpiserve/vLLM and how many greedy outputs are token-identical.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from mpiserve.bench.vllm_worker import run_vllm

VLLM_KV_CACHE_GIB = 4.0
VLLM_TIMEOUT_S = 3600.0
TTFT_PROMPT_LEN = 512
TTFT_SEED = 11


def vllm_run(vllm_python: str, model_dir: Path, dtype: str, prompts, max_tokens,
             label: str) -> dict | str:
    """One vLLM run in a fresh process: its result, or why it failed (printed either way)."""
    print(f"vLLM {dtype} {label} ...", flush=True)
    theirs = run_vllm(vllm_python, model_dir, dtype, prompts, max_tokens,
                      kv_cache_gib=VLLM_KV_CACHE_GIB, timeout_s=VLLM_TIMEOUT_S)
    if isinstance(theirs, str):
        print(f"  vLLM skipped: {theirs}", flush=True)
    else:
        print(f"  vLLM {theirs['vllm_version']}: {theirs['seconds']:.1f} s", flush=True)
    return theirs


def compare_dtype(dtype: str, prompts, max_tokens, mpiserve_run: dict,
                  vllm_runs: list[dict] | str) -> dict:
    """One dtype's figures: mpiserve's fastest run and vLLM's fastest of `vllm_runs` (or the
    reason vLLM did not run) on the same prompts."""
    total = sum(max_tokens)
    ours_tps = total / mpiserve_run["seconds"]
    entry = {"mpiserve_tokens_per_s": round(ours_tps, 2),
             "mpiserve_seconds": round(mpiserve_run["seconds"], 3),
             "mpiserve_seconds_all": [round(t, 3) for t in mpiserve_run["seconds_all"]],
             "mpiserve_matmul_dtype": mpiserve_run["matmul_dtype"],
             "mpiserve_all_full_length": mpiserve_run["all_full_length"]}
    if isinstance(vllm_runs, str):
        return entry | {"vllm_skipped": vllm_runs}
    theirs = min(vllm_runs, key=lambda run: run["seconds"])
    identical = sum(a == b for a, b in zip(mpiserve_run["outputs"], theirs["outputs"]))
    print(f"  vLLM {theirs['vllm_version']}: {theirs['tokens_per_s']:.1f} tokens/s; "
          f"{identical}/{len(prompts)} outputs identical to mpiserve's", flush=True)
    return entry | {"vllm_version": theirs["vllm_version"],
                    "vllm_tokens_per_s": round(theirs["tokens_per_s"], 2),
                    "vllm_seconds": round(theirs["seconds"], 3),
                    "vllm_seconds_all": [round(run["seconds"], 3) for run in vllm_runs],
                    "vllm_generated_tokens": theirs["generated_tokens"],
                    "ratio_mpiserve_over_vllm": round(ours_tps / theirs["tokens_per_s"], 3),
                    "identical_outputs": identical, "compared_outputs": len(prompts)}


def first_request_ttft(model_dir: Path, dtype: str, vocab: int, engine_options: dict) -> dict:
    """Time to first token of the first request after engine start against a warm one (a fresh
    prompt of the same length, so the prefix cache does not help)."""
    from mpiserve import LLM, SamplingParams

    context = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    length = min(TTFT_PROMPT_LEN, context // 2)
    rng = random.Random(TTFT_SEED)
    prompts = [[rng.randrange(5, vocab) for _ in range(length)] for _ in range(3)]
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    llm = LLM(str(model_dir), dtype=dtype, **engine_options)
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        output = llm.generate([prompt], one, progress=False)[0]
        times.append(time.perf_counter() - start)
        if output.error:
            raise SystemExit(f"mpiserve refused the TTFT request: {output.error}")
    warm = min(times[1:])
    return {"dtype": dtype, "prompt_len": length, "first_s": round(times[0], 4),
            "warm_s": round(warm, 4), "first_over_warm": round(times[0] / warm, 3)}


def markdown_lines(by_dtype: dict, ttft: list[dict]) -> list[str]:
    lines = ["## mpiserve vs vLLM CPU, per dtype", "",
             "| dtype | mpiserve multiplies in | mpiserve tok/s | vLLM tok/s | mpiserve / vLLM "
             "| identical outputs | runs (s): mpiserve; vLLM |",
             "|---|---|---:|---:|---:|---:|---|"]
    for dtype, e in by_dtype.items():
        head = f"| {dtype} | {e['mpiserve_matmul_dtype']} | {e['mpiserve_tokens_per_s']:.1f} |"
        if "vllm_tokens_per_s" in e:
            lines.append(f"{head} "
                         f"{e['vllm_tokens_per_s']:.1f} | "
                         f"{e['ratio_mpiserve_over_vllm']:.2f}x | "
                         f"{e['identical_outputs']}/{e['compared_outputs']} | "
                         + ", ".join(f"{t:.2f}" for t in e["mpiserve_seconds_all"]) + "; "
                         + ", ".join(f"{t:.2f}" for t in e["vllm_seconds_all"]) + " |")
        else:
            lines.append(f"{head} skipped: {e['vllm_skipped']} | | | |")
    lines += ["", "The two sides took turns (mpiserve, vLLM, mpiserve, ...); each side's fastest "
              "run counts (mpiserve on a fresh engine, vLLM in a fresh process each time).", ""]
    lines += [f"First request after engine start ({t['dtype']}, {t['prompt_len']}-token "
              f"prompt, one token): {t['first_s'] * 1000:.0f} ms against "
              f"{t['warm_s'] * 1000:.0f} ms warm ({t['first_over_warm']:.2f}x; target "
              "<= 1.5x)." for t in ttft]
    return lines + [""]

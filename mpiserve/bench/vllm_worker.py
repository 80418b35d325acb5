"""vLLM's CPU backend as a benchmark baseline, run in its own Python environment.

vLLM lives in a separate virtual environment (it must not touch mpiserve's). The benchmark
writes the job as JSON and runs this file with that environment's interpreter:

    VLLM_PYTHON/bin/python mpiserve/bench/vllm_worker.py JOB.json RESULT.json

JOB: {"model": DIR, "dtype": "float32" | "bfloat16", "prompts": [[token ids]...],
"max_tokens": [n...], "kv_cache_gib": float}. RESULT: {"vllm_version", "seconds",
"generated_tokens", "tokens_per_s", "outputs": [[token ids]...]}. Generation is greedy with
eos ignored, one engine over all prompts (loading and a short warm-up not timed), pinned to one
core. This file imports nothing from mpiserve: the vLLM environment does not have it.

`run_vllm` (used by mpiserve's benchmarks, in mpiserve's environment) does the round trip and
returns the result, or a string saying why vLLM was skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON_ENV = "MPISERVE_VLLM_PYTHON"      # the vLLM environment's python, when not passed


def vllm_python(path: str | None) -> tuple[str | None, str]:
    """The vLLM interpreter (argument, else $MPISERVE_VLLM_PYTHON), or None and the reason."""
    path = path or os.environ.get(PYTHON_ENV)
    if not path:
        return None, f"no vLLM python given (--vllm-python or ${PYTHON_ENV})"
    if not Path(path).is_file():
        return None, f"vLLM python {path} does not exist"
    return path, ""


def run_vllm(python: str, model: Path, dtype: str, prompts: list[list[int]],
             max_tokens: list[int], kv_cache_gib: float, timeout_s: float) -> dict | str:
    """Run the job in a child process of `python`; the result dict, or why it failed."""
    job = {"model": str(model), "dtype": dtype, "prompts": prompts, "max_tokens": max_tokens,
           "kv_cache_gib": kv_cache_gib}
    with tempfile.TemporaryDirectory(prefix="mpiserve-vllm-") as tmp:
        job_file, result_file = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_file.write_text(json.dumps(job))
        try:
            done = subprocess.run([python, __file__, str(job_file), str(result_file)],
                                  capture_output=True, text=True, timeout=timeout_s,
                                  env=worker_env(kv_cache_gib))
        except subprocess.TimeoutExpired:
            return f"vLLM did not finish within {timeout_s:.0f} s"
        if done.returncode != 0 or not result_file.is_file():
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            return f"vLLM worker exited {done.returncode}: " + " | ".join(tail)
        return json.loads(result_file.read_text())


def worker_env(kv_cache_gib: float) -> dict:
    """One core for vLLM's compute threads, and its KV budget."""
    return {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(kv_cache_gib))),
            "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def generate(job: dict) -> dict:
    """Greedy, eos ignored, all prompts in one `generate`; the timed run after a warm-up."""
    import vllm
    from vllm.inputs import TokensPrompt

    llm = vllm.LLM(model=job["model"], dtype=job["dtype"], seed=0,
                   max_model_len=max(len(p) + m for p, m in zip(job["prompts"],
                                                                job["max_tokens"])))
    params = [vllm.SamplingParams(max_tokens=m, temperature=0.0, ignore_eos=True)
              for m in job["max_tokens"]]
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    llm.generate([TokensPrompt(prompt_token_ids=job["prompts"][0][:32])],
                 vllm.SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True),
                 use_tqdm=False)
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    outputs = [list(r.outputs[0].token_ids) for r in results]
    generated = sum(map(len, outputs))
    return {"vllm_version": vllm.__version__, "seconds": seconds, "generated_tokens": generated,
            "tokens_per_s": generated / seconds, "outputs": outputs}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit("usage: vllm_worker.py JOB.json RESULT.json")
    # run as a script, this file's folder leads sys.path, where bench/kernels.py would shadow
    # the `kernels` package that vLLM's dependencies import
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    result = generate(json.loads(Path(sys.argv[1]).read_text()))
    Path(sys.argv[2]).write_text(json.dumps(result))

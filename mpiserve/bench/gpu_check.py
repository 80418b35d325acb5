"""One prepared check for a machine with one GPU: `python -m mpiserve.bench.gpu_check --out F`.

(a) greedy tokens of mpiserve's engine against transformers in bfloat16, (b) generation
throughput of both, with a profile of the engine's run (host functions, and how much of the
wall time the GPU's kernels filled), (c) the decode attention entry point (the numba-cuda
kernel on CUDA) against the torch reference at a few batch/context sizes. The model is a
seeded random Llama in Hugging Face format written to a temporary directory (nothing is
downloaded); the prompts share one length, so transformers runs them as one unpadded
batch. Needs torch, transformers and (for the kernel) numba-cuda; writes one JSON file.
`--device cpu --quick` runs every step on CPU with tiny sizes (the smoke test in CI).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from ..kernels import paged_attention
from .bench_model import QUICK, ModelShape, write_model
from .engine_throughput import NO_EOS, SEED
from .host_profile import profile_call

DTYPE = torch.bfloat16
FULL_SHAPE = ModelShape("gpu-check-llama", vocab_size=8192, hidden_size=512,
                        intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=4, max_position_embeddings=2048)
# (prompts, prompt length, new tokens); kernel sizes: (batch, context)
FULL_RUN = {"generate": (32, 256, 128), "kernel": ((1, 512), (16, 1024), (64, 2048))}
QUICK_RUN = {"generate": (4, 16, 8), "kernel": ((2, 40),)}


def seeded_prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(SEED)
    return torch.randint(5, vocab, (count, length), generator=generator).tolist()


def _timed(device: str, fn):
    """``fn()`` and its wall time in seconds, the device synchronised on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def engine_generate(model_dir: Path, device: str, prompts, new_tokens: int,
                    dtype: str = "bfloat16"):
    """A call that runs mpiserve's `LLM.generate` on `prompts` (greedy, eos ignored) and
    returns the token ids of each."""
    from mpiserve import LLM, SamplingParams

    llm = LLM(str(model_dir), device=device, dtype=dtype, kv_cache_gib=1.0,
              max_num_seqs=len(prompts), max_batch_tokens=4096)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return lambda: [o.token_ids for o in llm.generate(prompts, params, progress=False)]


def transformers_generate(model_dir: Path, device: str, prompts, new_tokens: int,
                          dtype: torch.dtype = DTYPE):
    """The same with transformers' batched greedy `generate` (the prompts share a length)."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()
    ids = torch.tensor(prompts, device=device)

    def generate():
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 do_sample=False, max_new_tokens=new_tokens, **NO_EOS)
        return out[:, ids.shape[1]:].tolist()
    return generate


def run_engine(model_dir: Path, device: str, prompts, new_tokens: int) -> dict:
    """Timed after one warm-up run of the same prompts, as transformers is; then profiled."""
    generate = engine_generate(model_dir, device, prompts, new_tokens)
    _, cold_seconds = _timed(device, generate)
    tokens, seconds = _timed(device, generate)
    return {"outputs": tokens, "seconds": seconds, "first_run_seconds": cold_seconds,
            "tokens_per_s": sum(map(len, tokens)) / seconds,
            "profile": profile_call(generate, device)}


def run_transformers(model_dir: Path, device: str, prompts, new_tokens: int) -> dict:
    generate = transformers_generate(model_dir, device, prompts, new_tokens)
    generate()                                                           # warm-up
    tokens, seconds = _timed(device, generate)
    return {"outputs": tokens, "seconds": seconds,
            "tokens_per_s": sum(map(len, tokens)) / seconds}


def compare(engine: list[list[int]], reference: list[list[int]]) -> dict:
    """How far each engine output agrees with transformers' (bfloat16 may diverge late)."""
    agree = [next((k for k, (a, b) in enumerate(zip(e, r)) if a != b), len(r))
             for e, r in zip(engine, reference)]
    return {"identical": sum(e == r for e, r in zip(engine, reference)),
            "first_token_identical": sum(n > 0 for n in agree), "prompts": len(reference),
            "agreeing_prefix_tokens": agree}


def time_kernel(device: str, batch: int, context: int, repeats: int) -> dict:
    """Decode attention (the entry point the model calls) against the torch reference."""
    heads, kv_heads, dim, page_size = 8, 4, 64, 16
    pages = (context + page_size - 1) // page_size
    generator = torch.Generator().manual_seed(SEED)
    kv = torch.randn(2, batch * pages, page_size, kv_heads, dim, generator=generator)
    q = torch.randn(batch, heads, dim, generator=generator)
    table = torch.randperm(batch * pages, generator=generator).reshape(batch, pages)
    args = (q.to(device, DTYPE), kv.to(device, DTYPE), table.to(device, torch.int32),
            torch.full((batch,), context, dtype=torch.int32, device=device), dim ** -0.5)
    row = {"batch": batch, "context": context}
    for name, fn in (("kernel", paged_attention.paged_decode_attention),
                     ("reference", paged_attention.paged_decode_attention_reference)):
        out, _ = _timed(device, lambda fn=fn: fn(*args))                  # compile / warm-up
        _, seconds = _timed(device, lambda fn=fn: [fn(*args) for _ in range(repeats)])
        row[f"{name}_ms"] = 1e3 * seconds / repeats
        row[f"{name}_out"] = out.float()
    row["max_abs_error"] = (row.pop("kernel_out") - row.pop("reference_out")).abs().max().item()
    row["speedup"] = row["reference_ms"] / row["kernel_ms"]
    return row


def kernel_path(device: str) -> str:
    """Which implementation the entry point runs for bfloat16 tensors on ``device``."""
    if device != "cuda":
        return "numba CPU kernel"
    try:
        from ..kernels import paged_attention_cuda
    except ImportError as error:
        return f"torch reference (numba-cuda not importable: {error})"
    probe = torch.empty(1, 1, 64, dtype=DTYPE, device=device)
    reason = paged_attention_cuda.unavailable_reason(probe, probe)
    return "numba-cuda kernel" if reason is None else f"torch reference ({reason})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny model and sizes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: torch sees no CUDA GPU here; run it on a machine with "
                         "one (or pass --device cpu --quick for the CPU smoke run)")
    shape, run = (QUICK, QUICK_RUN) if args.quick else (FULL_SHAPE, FULL_RUN)
    count, length, new_tokens = run["generate"]
    prompts = seeded_prompts(count, length, shape.vocab_size)
    result = {"device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "torch": torch.__version__, "dtype": "bfloat16", "model": shape.describe(),
              "prompts": count, "prompt_len": length, "new_tokens": new_tokens,
              "kernel_path": kernel_path(args.device)}
    with tempfile.TemporaryDirectory() as tmp:
        write_model(Path(tmp), shape, **NO_EOS)
        engine = run_engine(Path(tmp), args.device, prompts, new_tokens)
        reference = run_transformers(Path(tmp), args.device, prompts, new_tokens)
    result["greedy"] = compare(engine.pop("outputs"), reference.pop("outputs"))
    result["throughput"] = {"mpiserve": engine, "transformers": reference,
                            "ratio": engine["tokens_per_s"] / reference["tokens_per_s"]}
    repeats = 3 if args.quick else 20
    result["decode_attention"] = [time_kernel(args.device, b, c, repeats)
                                  for b, c in run["kernel"]]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(_summary(result), indent=2))


def _summary(result: dict) -> dict:
    """What is printed: the result without the per-prompt and per-function lists."""
    shown = {k: v for k, v in result.items() if k != "greedy"}
    engine = dict(shown["throughput"]["mpiserve"])
    engine["profile"] = {k: v for k, v in engine["profile"].items() if not isinstance(v, list)}
    shown["throughput"] = {**shown["throughput"], "mpiserve": engine}
    return shown


if __name__ == "__main__":
    main()

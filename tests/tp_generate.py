"""Run under `mpiexec -n N`: greedy generation by one engine split over the N ranks
(`LLM(tensor_parallel_size=N)`). Every rank writes the token ids it got back to
OUT_DIR/rank{R}.json, and the weight bytes it holds; then the same prompts again with two
greedy samples each and their log probabilities (prompt and generated).

    python tp_generate.py MODEL_DIR PROMPTS.json MAX_TOKENS OUT_DIR
"""

import json
import sys
from pathlib import Path

from mpiserve import LLM, SamplingParams


def main(model_dir: str, prompts_file: str, max_tokens: str, out_dir: str) -> None:
    from mpi4py import MPI
    size, rank = MPI.COMM_WORLD.Get_size(), MPI.COMM_WORLD.Get_rank()
    llm = LLM(model_dir, tensor_parallel_size=size, page_size=16, num_pages=64)
    prompts = json.loads(Path(prompts_file).read_text())
    params = SamplingParams(max_tokens=int(max_tokens), temperature=0.0, ignore_eos=True)
    outputs = llm.generate(prompts, params)
    scored = llm.generate(prompts, SamplingParams(max_tokens=int(max_tokens), temperature=0.0,
                                                  ignore_eos=True, n=2, logprobs=0,
                                                  prompt_logprobs=0))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(
        {"tokens": [o.token_ids for o in outputs], "weight_bytes": llm.engine.model.weight_bytes,
         "kv_heads": llm.engine.kv.layers[0].shape[3],
         "samples": [[s.token_ids for s in o.samples] for o in scored],
         "logprobs": [[e.logprob for e in (o.prompt_logprobs + o.logprobs)] for o in scored]}))


if __name__ == "__main__":
    main(*sys.argv[1:])

"""A tensor-parallel engine (`LLM(tensor_parallel_size=N)` under a real `mpiexec -n N`, gloo):
the greedy tokens of 2 and 4 ranks equal transformers' and one rank's, on every rank, and so
do n greedy samples and the log probabilities of prompt and output."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from batch_jobs import MPIEXEC, job_env
from test_engine_vs_transformers import prompts_for, reference

from mpiserve.cluster.kv_routes import kv_routes
from mpiserve.model.model_config import ModelConfig
from mpiserve.model.tensor_shard import TensorShard

SCRIPT = Path(__file__).with_name("tp_generate.py")
LENGTHS = [16, 17, 1, 5, 45]
MAX_TOKENS = 8


def run_tp(model_dir: Path, ranks: int, tmp_path: Path, lengths=LENGTHS) -> list[dict]:
    prompts = prompts_for(ModelConfig.from_dir(model_dir).vocab_size, lengths)
    prompts_file = tmp_path / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    out = tmp_path / f"tp{ranks}"
    out.mkdir()
    done = subprocess.run([str(MPIEXEC), "-n", str(ranks), sys.executable, str(SCRIPT),
                           str(model_dir), str(prompts_file), str(MAX_TOKENS), str(out)],
                          env=job_env(), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]


# (architecture, ranks): GQA split 2 ways with q/k/v biases; per-head q/k norms and a tied,
# vocabulary-split table; KV heads replicated over 4 ranks (2 KV heads)
CASES = [("qwen2", 2), ("qwen3_tied", 2), ("llama_tied", 4)]


@pytest.mark.parametrize("arch,ranks", CASES, ids=[f"{a}-tp{n}" for a, n in CASES])
def test_tensor_parallel_greedy_matches_transformers(tiny_hf_model, tmp_path, arch, ranks):
    model_dir = tiny_hf_model(arch)
    results = run_tp(model_dir, ranks, tmp_path)
    prompts = prompts_for(ModelConfig.from_dir(model_dir).vocab_size, LENGTHS)
    expected = reference(model_dir, prompts, MAX_TOKENS)
    for rank, result in enumerate(results):
        assert result["tokens"] == expected, f"rank {rank}"
        assert result["samples"] == [[tokens, tokens] for tokens in expected], f"rank {rank}"
    assert_scored_like_transformers(model_dir, prompts, expected, results[0]["logprobs"])
    config = ModelConfig.from_dir(model_dir)
    assert [r["kv_heads"] for r in results] == [max(1, config.num_kv_heads // ranks)] * ranks


def assert_scored_like_transformers(model_dir, prompts, outputs, logprobs):
    """Prompt tokens 1.. then the generated ones, against transformers' log-softmax."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    for prompt, output, scored in zip(prompts, outputs, logprobs):
        tokens = prompt + output
        with torch.inference_mode():
            rows = torch.log_softmax(model(torch.tensor([tokens])).logits[0].float(), dim=-1)
        want = rows[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])].tolist()
        assert scored == pytest.approx(want, abs=1e-4)


def test_weights_split_over_ranks(tiny_hf_model, tmp_path):
    """Each of 2 ranks holds about half the weights (norms are replicated)."""
    model_dir = tiny_hf_model("llama_tied")
    whole = run_tp(model_dir, 1, tmp_path, lengths=[3])[0]["weight_bytes"]
    halves = [r["weight_bytes"] for r in run_tp(model_dir, 2, tmp_path, lengths=[3])]
    assert all(0.45 * whole < half <= 0.55 * whole for half in halves), (whole, halves)


def test_indivisible_heads_are_refused_naming_the_counts(tiny_hf_model, tmp_path):
    model_dir = tiny_hf_model("llama", num_attention_heads=4, num_key_value_heads=4)
    with pytest.raises(AssertionError, match="4 attention heads do not divide by tensor-"
                                             "parallel size 3"):
        run_tp(model_dir, 3, tmp_path, lengths=[3])


def test_shard_ranges_cover_each_tensor_once():
    """Pure bookkeeping: the ranks' row ranges tile q/k/v, MLP and vocabulary exactly."""
    config = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 1001, "hidden_size": 64,
                                    "intermediate_size": 96, "num_hidden_layers": 1,
                                    "num_attention_heads": 8, "num_key_value_heads": 2},
                                   source="test")
    for size in (2, 4, 8):
        shards = [TensorShard(size, r) for r in range(size)]
        assert all(s.problem(config) is None for s in shards)
        vocab = [s.vocab(config) for s in shards]
        assert vocab[0][0] == 0 and vocab[-1][1] == 1001
        assert all(a[1] == b[0] for a, b in zip(vocab, vocab[1:]))
        heads = [s.heads(config) for s in shards]
        assert sum(e - b for b, e in heads) == 8
        for s in shards:     # a rank's query heads all read KV heads that rank holds
            (h0, h1), (k0, k1) = s.heads(config), s.kv_heads(config)
            assert k0 <= h0 // 4 and (h1 - 1) // 4 < k1
    assert TensorShard(3, 0).problem(config) == ("8 attention heads do not divide by "
                                                 "tensor-parallel size 3")


@pytest.mark.parametrize("senders,receivers", [(1, 1), (2, 1), (1, 2), (2, 2), (4, 2), (2, 4),
                                               (8, 4), (1, 8)])
def test_kv_routes_give_each_receiving_rank_its_heads_once(senders, receivers):
    """Pure bookkeeping: with 4 KV heads, every receiving rank gets exactly the heads it holds,
    each from one sending rank that holds it, and no pair exchanges two ranges."""
    heads = 4
    routes = kv_routes(heads, senders, receivers)
    assert len({(r.sender, r.receiver) for r in routes}) == len(routes)
    for receiver in range(receivers):
        got = sorted(r.heads for r in routes if r.receiver == receiver)
        want = TensorShard(receivers, receiver).kv_head_range(heads)
        assert got[0][0] == want[0] and got[-1][1] == want[1]
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        for route in routes:
            held = TensorShard(senders, route.sender).kv_head_range(heads)
            assert held[0] <= route.heads[0] < route.heads[1] <= held[1]

"""Greedy outputs of mpiserve's engine are token-identical to transformers' generate."""

import pytest
import torch
import transformers

from mpiserve import LLM, SamplingParams

# (architecture, config overrides): GQA by default, MHA and MQA variants, tied embeddings
MODELS = [("llama", {}), ("llama3", {}), ("mistral", {}), ("qwen2", {}), ("qwen3", {}),
          ("llama_tied", {}), ("qwen3_tied", {}), ("llama", {"num_key_value_heads": 4}),
          ("qwen2", {"num_key_value_heads": 1})]
PAGE = 16
# lengths on a page boundary, just off it, a single token and a multi-page prompt
LENGTHS = [16, 17, 1, 5, 32, 45]


def prompts_for(vocab, lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def reference(model_dir, prompts, max_tokens, dtype=torch.float32):
    """transformers' greedy generate, one prompt at a time (no padding), eos ignored."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return greedy_reference(model, prompts, max_tokens)


def greedy_reference(model, prompts, max_tokens):
    """`reference` on a transformers model already loaded."""
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_tokens,
                                           min_new_tokens=max_tokens, eos_token_id=None,
                                           pad_token_id=0)
    outs = []
    with torch.inference_mode():
        for ids in prompts:
            full = model.generate(torch.tensor([ids]), generation_config=config)
            outs.append(full[0, len(ids):].tolist())
    return outs


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("arch,overrides", MODELS,
                         ids=[a + "".join(f"-kv{v}" for v in o.values()) for a, o in MODELS])
def test_mixed_batch_matches_transformers(tiny_hf_model, arch, overrides):
    model_dir = tiny_hf_model(arch, **overrides)
    llm = LLM(str(model_dir), page_size=PAGE, num_pages=64)
    prompts = prompts_for(llm.engine.model_config.vocab_size, LENGTHS)
    outs = llm.generate(prompts, greedy(10))
    assert [o.token_ids for o in outs] == reference(model_dir, prompts, 10)


def test_prefix_cache_hit_matches_transformers(tiny_hf_model):
    model_dir = tiny_hf_model("llama")
    llm = LLM(str(model_dir), page_size=PAGE, num_pages=64)
    shared = prompts_for(300, [40])[0]
    first = llm.generate([shared + [5, 6]], greedy(6))
    hits_before = llm.engine.pool.hit_tokens
    second = llm.generate([shared + [7, 8, 9]], greedy(6))
    assert llm.engine.pool.hit_tokens - hits_before == 32    # two full pages reused
    expected = reference(model_dir, [shared + [5, 6], shared + [7, 8, 9]], 6)
    assert [first[0].token_ids, second[0].token_ids] == expected


def test_chunked_prefill_matches_transformers(tiny_hf_model):
    model_dir = tiny_hf_model("qwen2")
    llm = LLM(str(model_dir), page_size=PAGE, num_pages=64, max_batch_tokens=7)
    prompts = prompts_for(300, [50, 23, 9], seed=1)
    outs = llm.generate(prompts, greedy(8))
    assert [o.token_ids for o in outs] == reference(model_dir, prompts, 8)


def test_preemption_by_recompute_matches_transformers(tiny_hf_model):
    model_dir = tiny_hf_model("llama")
    # 12 pages of 4 tokens: four 20-token requests growing to 36 tokens cannot all stay
    llm = LLM(str(model_dir), page_size=4, num_pages=12)
    prompts = prompts_for(300, [20, 18, 21, 19], seed=2)
    outs = llm.generate(prompts, greedy(16))
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == reference(model_dir, prompts, 16)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("matmul_dtype", ["auto", "float32", "same"])
def test_half_precision_follows_transformers(tiny_hf_model, dtype, matmul_dtype):
    """Half precision: the first tokens agree with transformers in the same dtype, whether the
    linear layers multiply natively or in widened float32 weights."""
    model_dir = tiny_hf_model("llama")
    matmul_dtype = dtype if matmul_dtype == "same" else matmul_dtype
    llm = LLM(str(model_dir), page_size=PAGE, num_pages=64, dtype=dtype,
              matmul_dtype=matmul_dtype)
    prompts = prompts_for(300, [12, 30], seed=3)
    outs = llm.generate(prompts, greedy(3))
    expected = reference(model_dir, prompts, 3, dtype=getattr(torch, dtype))
    assert [o.token_ids[:1] for o in outs] == [e[:1] for e in expected]
    assert all(len(o.token_ids) == 3 for o in outs)

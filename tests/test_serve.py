"""`mpiserve serve` under a real `mpiexec` (router + prefill + decode, every built-in router in
turn), driven by the official `openai` client: completions, chat, streaming, logprobs, n,
echo, the API key, a client that leaves mid-stream, 200 concurrent streams, and SIGTERM."""

import asyncio
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from batch_jobs import MPIEXEC, MPISERVE, job_env, kill_tree, log_text

from mpiserve import LLM, SamplingParams

pytestmark = [pytest.mark.mpi, pytest.mark.timeout(600)]

openai = pytest.importorskip("openai")
EVERY_ROUTER = str(Path(__file__).with_name("routers_in_turn.py")) + ":every_builtin"
KEY = "test-key"
START_TIMEOUT_S = 120
PROMPTS = [f"Tell me about the {thing}." for thing in
           ("river", "mill", "bread", "glacier", "lighthouse", "train", "bee", "library")]


class Server:
    def __init__(self, folder: Path):
        self.log = folder / "serve.log"
        with open(self.log, "wb") as sink:
            self.proc = subprocess.Popen(
                [str(MPIEXEC), "-n", "3", str(MPISERVE), "serve", "--port", "0",
                 "--router", EVERY_ROUTER, "--api-key", KEY, "--dashboard", "plain",
                 "--drain-timeout", "60"],
                stdout=sink, stderr=subprocess.STDOUT, env=job_env(), cwd=folder,
                start_new_session=True)
        self.url = self._wait_for_url()
        self._wait_healthy()

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline and self.proc.poll() is None:
            found = re.search(r"serving (http://\S+/v1)", self.log.read_text(errors="replace"))
            if found:
                return found[1]
            time.sleep(0.2)
        kill_tree(self.proc)
        pytest.fail(f"the server did not start:\n{log_text(self.log)}")

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            status, _ = self.get("/health")
            if status == 200:
                return
            time.sleep(0.2)
        pytest.fail(f"the engines did not become ready:\n{log_text(self.log)}")

    def get(self, path: str, key: str | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url.removesuffix("/v1") + path)
        if key:
            request.add_header("Authorization", f"Bearer {key}")
        try:
            with urllib.request.urlopen(request, timeout=10) as answer:
                return answer.status, answer.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    def metric(self, line_start: str) -> float:
        _, text = self.get("/metrics", KEY)
        values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith(line_start)]
        return sum(values)

    def client(self, key: str = KEY, asynchronous: bool = False):
        kind = openai.AsyncOpenAI if asynchronous else openai.OpenAI
        return kind(base_url=self.url, api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("serve"))
    yield server
    if server.proc.poll() is None:
        kill_tree(server.proc)


@pytest.fixture(scope="module")
def offline():
    return LLM(None)


def test_completion_with_logprobs_equals_the_offline_engine(server, offline):
    answer = server.client().completions.create(model="mpiserve-demo", prompt=PROMPTS[0],
                                                max_tokens=8, temperature=0, logprobs=2)
    want = offline.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0,
                                                          logprobs=2))[0]
    choice = answer.choices[0]
    assert choice.token_ids == want.token_ids and choice.text == want.text
    assert choice.logprobs.token_logprobs == pytest.approx(
        [e.logprob for e in want.logprobs], abs=1e-4)
    assert answer.usage.completion_tokens == 8


def test_chat_n_and_echo(server, offline):
    client = server.client()
    chat = client.chat.completions.create(
        model="mpiserve-demo", messages=[{"role": "user", "content": "Name a river."}],
        max_tokens=6, temperature=0, n=2, logprobs=True, top_logprobs=1)
    assert len(chat.choices) == 2
    assert chat.choices[0].message.content == chat.choices[1].message.content
    assert len(chat.choices[0].logprobs.content) == len(chat.choices[0].token_ids)
    echo = client.completions.create(model="mpiserve-demo", prompt=PROMPTS[1], max_tokens=0,
                                     echo=True, logprobs=1, temperature=0)
    assert echo.choices[0].text == PROMPTS[1] and echo.usage.completion_tokens == 0
    assert echo.choices[0].logprobs.token_logprobs[0] is None
    assert len(echo.choices[0].logprobs.tokens) == echo.usage.prompt_tokens


def test_streamed_chat_adds_up_to_the_whole_answer(server):
    client = server.client()
    messages = [{"role": "user", "content": "Describe a lighthouse."}]
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=12,
                                           temperature=0)
    chunks = list(client.chat.completions.create(
        model="m", messages=messages, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    tokens = [t for c in chunks if c.choices for t in c.choices[0].token_ids]
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert text == whole.choices[0].message.content
    assert tokens == whole.choices[0].token_ids
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == len(tokens)


def test_api_key_is_required_except_for_health(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(key="wrong").models.list()
    assert server.get("/health")[0] == 200
    assert server.get("/metrics")[0] == 401
    assert [m.id for m in server.client().models.list().data] == ["mpiserve-demo"]


def test_bad_requests_get_400_naming_the_field(server):
    with pytest.raises(openai.BadRequestError, match="body.presence_penalty"):
        server.client().completions.create(model="m", prompt="x", presence_penalty=5)
    with pytest.raises(openai.BadRequestError, match="body.suffix is not supported"):
        server.client().completions.create(model="m", prompt="x", suffix="end")


def test_a_client_that_leaves_mid_stream_frees_its_pages(server):
    aborted = server.metric('mpiserve_requests_total{outcome="client_gone"}')
    engine_aborts = server.metric("mpiserve_engine_requests_aborted_total")
    stream = server.client().completions.create(
        model="m", prompt=PROMPTS[2], max_tokens=400, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    for _, chunk in zip(range(3), stream):
        assert chunk.choices[0].finish_reason is None
    stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        gone = server.metric('mpiserve_requests_total{outcome="client_gone"}')
        settled = (server.metric("mpiserve_engine_requests_aborted_total") > engine_aborts
                   and server.metric("mpiserve_engine_pages_used") == 0)
        if gone == aborted + 1 and settled:      # engine stats come every 0.5 s
            break
        time.sleep(0.3)
    assert server.metric('mpiserve_requests_total{outcome="client_gone"}') == aborted + 1
    assert server.metric("mpiserve_engine_requests_aborted_total") == engine_aborts + 1
    assert server.metric("mpiserve_engine_pages_used") == 0
    assert server.metric("mpiserve_engine_running") == 0


def test_200_concurrent_streams_lose_and_repeat_no_token(server):
    client = server.client()
    want = {p: client.completions.create(model="m", prompt=p, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True}).choices[0].token_ids
            for p in PROMPTS}

    async def one(aclient, prompt):
        stream = await aclient.completions.create(
            model="m", prompt=prompt, max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        tokens, reasons, usage = [], [], None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage.completion_tokens
            for choice in chunk.choices:
                tokens.extend(choice.token_ids)
                reasons.append(choice.finish_reason)
        return prompt, tokens, reasons, usage

    async def all_of_them():
        aclient = server.client(asynchronous=True)
        return await asyncio.gather(*(one(aclient, PROMPTS[i % len(PROMPTS)])
                                      for i in range(200)))

    results = asyncio.run(all_of_them())
    assert len(results) == 200
    for prompt, tokens, reasons, usage in results:
        assert tokens == want[prompt] and usage == len(tokens)
        assert reasons[-1] == "length" and not any(reasons[:-1])


def test_sigterm_drains_streams_in_flight_then_exits_3(server):
    """Last: the job stops. A stream in flight at SIGTERM still ends with its finish reason."""
    stream = server.client().completions.create(
        model="m", prompt=PROMPTS[3], max_tokens=30, temperature=0, stream=True,
        extra_body={"ignore_eos": True})
    first = next(iter(stream))
    os.killpg(server.proc.pid, signal.SIGTERM)
    rest = list(stream)
    tokens = first.choices[0].token_ids + [t for c in rest for t in c.choices[0].token_ids]
    assert len(tokens) == 30 and rest[-1].choices[0].finish_reason == "length"
    assert server.proc.wait(timeout=120) == 3, log_text(server.log)
    summary = json.loads((server.log.parent / "mpiserve-serve.run" / "summary.json").read_text())
    assert summary["totals"]["completed"] >= 200

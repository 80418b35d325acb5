"""Batch input parsing and output records in the OpenAI Batch API format."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpiserve.batch.choices import Choice
from mpiserve.batch.input_file import URL_KINDS, BatchInputError, BatchItem, read_batch
from mpiserve.batch.output_file import (
    BatchOutput,
    BatchOutputError,
    _still_named,
    completion_record,
    error_record,
)

REPO = Path(__file__).resolve().parents[1]


def request(custom_id="r", url="/v1/completions", **body):
    """One input line's object; a prompt or messages is filled in unless given."""
    if url == "/v1/chat/completions":
        body.setdefault("messages", [{"role": "user", "content": "Hi"}])
    else:
        body.setdefault("prompt", "Hi")
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def line_bytes(line):
    if isinstance(line, bytes):
        return line
    return (line if isinstance(line, str) else json.dumps(line)).encode()


def write_lines(path, *lines):
    path.write_bytes(b"".join(line_bytes(line) + b"\n" for line in lines))
    return path


@pytest.fixture(autouse=True)
def in_tmp_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def read_items(*lines):
    return list(read_batch(write_lines(Path("batch.jsonl"), *lines)))


VALID = request("first")

# (line, words the error message must contain)
BAD_LINES = [
    ('{"custom_id": "x", ', ["invalid JSON"]),
    (b'{"custom_id": "\xff"}', ["not valid UTF-8", "0xff"]),
    ("[1, 2]", ["must be a JSON object"]),
    ({k: v for k, v in request().items() if k != "custom_id"}, ["custom_id is missing"]),
    (dict(request(), custom_id=7), ["custom_id must be a non-empty string"]),
    (dict(request(), custom_id=""), ["custom_id must be a non-empty string"]),
    (request("first"), ['custom_id "first" duplicates line 1']),
    (dict(request(), method="GET"), ["method", '"GET"']),
    ({k: v for k, v in request().items() if k != "method"}, ["method is missing"]),
    ("[" * 100_000 + "]" * 100_000, ["invalid JSON", "recursion"]),
    ('{"custom_id": "d", "n": ' + "9" * 5000 + "}", ["invalid JSON", "digits"]),
    (dict(request(), url="/v1/embeddings"), ["url must be one of", "/v1/embeddings"]),
    (dict(request(), url=["/v1/completions"]), ["url must be one of", "an array"]),
    (dict(request(), body=None), ["body is missing"]),
    (dict(request(), body=[1]), ["body must be a JSON object"]),
    (dict(request(), body={"max_tokens": 3}), ["body.prompt is missing"]),
    (dict(request(url="/v1/chat/completions"), body={"prompt": "a"}), ["body.messages is missing"]),
    (request(prompt=""), ["body.prompt must be a non-empty string"]),
    (request(prompt=["a", "b"]), ["body.prompt[0] must be a token id"]),
    (request(prompt=[1, -2]), ["body.prompt[1] must be a token id"]),
    (request(prompt=[1, True]), ["body.prompt[1] must be a token id"]),
    (request(url="/v1/chat/completions", messages=[]), ["body.messages must be a non-empty", "[]"]),
    (request(url="/v1/chat/completions", messages=["hi"]), ["body.messages[0] must be an object"]),
    (request(url="/v1/chat/completions", messages=[{"role": "bot", "content": "x"}]),
     ["body.messages[0].role", '"bot"']),
    (request(url="/v1/chat/completions",
             messages=[{"role": "user", "content": "a"}, {"role": "user", "content": 5}]),
     ["body.messages[1].content"]),
    (request(url="/v1/chat/completions",
             messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
     ["body.messages[0].content"]),
    (request(max_tokens=0), ["body.max_tokens", "must be at least 1"]),
    (request(max_tokens="16"), ["body.max_tokens must be an integer", '"16"']),
    (request(max_tokens=2.5), ["body.max_tokens must be an integer"]),
    (request(temperature=-0.5), ["body.temperature", "must be >= 0"]),
    (request(temperature="hot"), ["body.temperature must be a finite number"]),
    ('{"custom_id": "t", "method": "POST", "url": "/v1/completions", '
     '"body": {"prompt": "a", "temperature": 1e999}}', ["body.temperature must be a finite"]),
    (request(top_p=0), ["body.top_p", "must be in (0, 1]"]),
    (request(top_k=0), ["body.top_k", "must be -1 (off) or >= 1"]),
    (request(seed=1.5), ["body.seed must be an integer"]),
    (request(stop=["ok", 3]), ["body.stop must be a string or a list of strings"]),
    (request(stop=""), ["body.stop", "must be non-empty strings"]),
    (request(ignore_eos=1), ["body.ignore_eos must be true or false"]),
    (request(n=0), ["body.n=0 must be in [1, 128]"]),
    (request(n=2, best_of=3), ["body.best_of is not supported", "3", "(or n)"]),
    (request(logprobs=21), ["body.logprobs must be an integer in [0, 20]", "21"]),
    (request(logprobs=True), ["body.logprobs must be an integer in [0, 20]", "true"]),
    (request(url="/v1/chat/completions", logprobs=3), ["body.logprobs must be true or false"]),
    (request(url="/v1/chat/completions", top_logprobs=3), ["body.top_logprobs needs",
                                                           "body.logprobs set to true"]),
    (request(url="/v1/chat/completions", echo=True), ["body.echo is for /v1/completions"]),
    (request(echo="yes"), ["body.echo must be true or false"]),
    (request(presence_penalty=2.5), ["body.presence_penalty=2.5 must be in [-2, 2]"]),
    (request(repetition_penalty=0), ["body.repetition_penalty=0 must be > 0"]),
    (request(logit_bias={"five": 100}), ["body.logit_bias must be an object of token ids"]),
    (request(logit_bias={"5": 101}), ["body.logit_bias", "[-100, 100]"]),
    (request(min_tokens=40, max_tokens=8), ["body.min_tokens=40 must be in [0, max_tokens=8]"]),
    (request(stop_token_ids=[1, "2"]), ["body.stop_token_ids must be a list of token ids"]),
    (request(stream=True), ["body.stream is not supported"]),
    (request(suffix="end"), ["body.suffix is not supported"]),
    (request(url="/v1/chat/completions", max_completion_tokens=0),
     ["body.max_completion_tokens", "must be at least 1"]),
    (request(url="/v1/chat/completions", max_tokens=4, max_completion_tokens=4),
     ["not both"]),
]


@pytest.mark.parametrize("line, words", BAD_LINES, ids=[words[0] for _, words in BAD_LINES])
def test_each_bad_line_gives_one_error_item_naming_file_line_and_field(line, words):
    items = read_items(VALID, "", line, request("last"))
    assert [item.line_no for item in items] == [1, 3, 4]
    assert items[0].error is None and items[2].error is None
    bad = items[1]
    assert bad.error.startswith("batch.jsonl line 3: ")
    for word in words:
        assert word in bad.error
    assert bad.params is None and bad.prompt is None and bad.messages is None
    record = error_record(bad, bad.error)
    assert record["error"]["line"] == 3 and record["error"]["message"] == bad.error


def test_error_message_example():
    lines = [request(f"r{i}") for i in range(6)] + [request("r6", max_tokens=0)]
    item = read_items(*lines)[6]
    assert item.error == "batch.jsonl line 7: body.max_tokens=0 must be at least 1"
    assert item.custom_id == "r6" and item.kind == "completion"


def test_mixed_file_keeps_order_and_count():
    lines = [request("a"), "not json", "", "   ", request("b", max_tokens=-1),
             request("c", url="/v1/chat/completions"), "{}", request("a"), request("d")]
    items = read_items(*lines)
    assert [item.line_no for item in items] == [1, 2, 5, 6, 7, 8, 9]
    assert [item.error is None for item in items] == [True, False, False, True, False, False, True]
    assert [item.custom_id for item in items] == ["a", None, "b", "c", None, "a", "d"]


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8)
FIELD = st.sampled_from(["custom_id", "method", "url", "body", "prompt", "messages", "role",
                         "content", "max_tokens", "temperature", "top_p", "stop", "n"])
REQUEST_LIKE = st.fixed_dictionaries(
    {"custom_id": st.text(max_size=2), "method": st.just("POST"),
     "url": st.sampled_from(list(URL_KINDS)),
     "body": st.dictionaries(FIELD, JSON, max_size=4)},
    optional={"extra": st.dictionaries(FIELD, JSON, max_size=2)})
LINE = (st.binary(max_size=30).map(lambda b: b.replace(b"\n", b""))
        | JSON.map(json.dumps) | REQUEST_LIKE.map(json.dumps))


@settings(max_examples=300, deadline=None)
@given(st.lists(LINE, max_size=8))
def test_any_line_gives_exactly_one_item(lines):
    items = read_items(*lines)
    expected = [n for n, line in enumerate(lines, 1) if line_bytes(line).strip()]
    assert [item.line_no for item in items] == expected
    for item in items:
        assert (item.error is None) == (item.params is not None)
        assert item.error is None or item.error.startswith(f"batch.jsonl line {item.line_no}: ")


def test_completion_defaults_and_fields():
    plain, full = read_items(request("p", model="any", user="u", n=1, logprobs=None),
                             request("f", max_tokens=5, temperature=0, top_p=0.5, top_k=3,
                                     seed=11, stop="\n", ignore_eos=True, temperature_x=9))
    assert plain.kind == "completion" and plain.prompt == "Hi" and plain.messages is None
    assert plain.params.max_tokens == 16 and plain.params.temperature == 1.0
    p = full.params
    assert (p.max_tokens, p.temperature, p.top_p, p.top_k, p.seed, p.stop, p.ignore_eos) == \
        (5, 0, 0.5, 3, 11, ("\n",), True)


def test_unimplemented_fields_at_their_defaults_are_accepted():
    (item,) = read_items(request(logprobs=None, echo=False, best_of=1, presence_penalty=0,
                                 frequency_penalty=0.0, repetition_penalty=1.0, min_tokens=0,
                                 logit_bias={}, stop_token_ids=[], stream=False,
                                 response_format={"type": "text"}))
    assert item.error is None


def test_null_fields_take_defaults():
    (item,) = read_items(request(max_tokens=None, temperature=None, stop=None, n=None))
    assert item.error is None and item.params.max_tokens == 16 and item.params.stop == ()


def test_token_id_prompt():
    (item,) = read_items(request(prompt=[1, 15043, 0]))
    assert item.error is None and item.prompt == [1, 15043, 0]


def test_chat_body():
    messages = [{"role": "system", "content": "Be brief.", "name": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "Hello"},
                                             {"type": "text", "text": "there"}]},
                {"role": "assistant", "content": "Hi"}]
    default, capped = read_items(
        request("c1", url="/v1/chat/completions", messages=messages, stop=["a", "b"]),
        request("c2", url="/v1/chat/completions", max_completion_tokens=7))
    assert default.kind == "chat" and default.prompt is None
    assert default.messages == [{"role": "system", "content": "Be brief."},
                                {"role": "user", "content": "Hello\nthere"},
                                {"role": "assistant", "content": "Hi"}]
    assert default.params.max_tokens == 256 and default.params.stop == ("a", "b")
    assert capped.params.max_tokens == 7


def test_byte_order_mark_and_crlf(tmp_path):
    path = tmp_path / "batch.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(request("a")).encode() + b"\r\n"
                     + json.dumps(request("b")).encode() + b"\r\n")
    assert [(i.custom_id, i.error) for i in read_batch(path)] == [("a", None), ("b", None)]


def test_byte_order_mark_on_a_later_line_is_an_error_that_keeps_the_id():
    bom = b"\xef\xbb\xbf"
    first, later = read_items(bom + line_bytes(request("a")), bom + line_bytes(request("b")))
    assert first.error is None
    assert later.custom_id == "b" and later.duplicate_of is None
    assert "line 2" in later.error and "byte order mark is allowed only on line 1" in later.error
    assert error_record(later, later.error)["custom_id"] == "b"


def test_duplicate_id_record_keeps_the_id_but_answers_only_its_line(tmp_path):
    """The repeat's record names the id it read, and a resume still runs the first line
    when only the repeat has a record."""
    first, repeat = read_items(request("a"), request("a"))
    assert repeat.custom_id == "a" and repeat.duplicate_of == 1
    assert "duplicates line 1" in repeat.error
    record = error_record(repeat, repeat.error, repeat.error_code)
    assert record["custom_id"] == "a" and record["response"]["status_code"] == 400
    with BatchOutput(tmp_path / "out.jsonl") as output:
        output.write(record)
    with BatchOutput(tmp_path / "out.jsonl") as output:
        assert output.is_done(repeat) and not output.is_done(first)


def test_missing_input_file_names_it(tmp_path):
    with pytest.raises(BatchInputError, match="nothere.jsonl"):
        read_batch(tmp_path / "nothere.jsonl")


def completion_item(kind="completion"):
    return BatchItem(line_no=4, custom_id="req-4", kind=kind, prompt="Hi")


METRICS = {"ttft": 0.1, "tpot": 0.02, "jct": 0.3, "queue_time": 0.01, "prefix_matched": 0,
           "kv_bytes": 1024, "engines": [1, 2], "router": "round_robin"}


def test_text_completion_record_shape():
    record = completion_record(completion_item(), 17, [Choice([5, 6, 7], " a b c", "length")],
                               3, METRICS, "tiny-llama")
    assert record["id"] == "batch_req_17" and record["custom_id"] == "req-4"
    assert record["error"] is None
    response = record["response"]
    assert response["status_code"] == 200 and response["request_id"] == "17"
    body = response["body"]
    assert body["object"] == "text_completion" and body["model"] == "tiny-llama"
    assert isinstance(body["created"], int) and body["id"] == "cmpl-17"
    assert body["choices"] == [{"index": 0, "text": " a b c", "logprobs": None,
                                "finish_reason": "length", "token_ids": [5, 6, 7]}]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert body["metrics"] == METRICS
    assert json.loads(json.dumps(record)) == record


def test_chat_completion_record_shape():
    record = completion_record(completion_item("chat"), "q9", [Choice([8], "Yes", "stop")], 12,
                               {}, "m")
    body = record["response"]["body"]
    assert body["object"] == "chat.completion" and body["id"] == "chatcmpl-q9"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Yes"}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert "text" not in body["choices"][0]
    assert body["usage"]["total_tokens"] == 13


def test_completion_record_rejects_unknown_finish_reason():
    with pytest.raises(ValueError, match="finish_reason"):
        completion_record(completion_item(), 1, [Choice([], "", "eos")], 1, {}, "m")


def test_error_record_for_unreadable_line():
    (item,) = read_items(*[""] * 4, "oops")
    record = error_record(item, item.error)
    assert record["custom_id"] is None and record["response"] is None
    assert record["id"].startswith("batch_req_")
    assert record["error"] == {"code": "invalid_request", "message": item.error, "line": 5}
    assert "line 5" in record["error"]["message"]


def test_error_record_for_invalid_request():
    (item,) = read_items(request("bad", top_p=2))
    record = error_record(item, item.error)
    assert record["custom_id"] == "bad" and record["error"]["line"] == 1
    response = record["response"]
    assert response["status_code"] == 400
    assert response["body"]["error"] == {"message": item.error, "type": "invalid_request_error",
                                         "param": None, "code": "invalid_request"}


def test_error_record_for_server_failure():
    record = error_record("req-3", "prompt needs 900 pages, pool has 512", code="capacity")
    assert record["response"]["status_code"] == 500
    assert record["response"]["body"]["error"]["type"] == "server_error"
    assert record["error"] == {"code": "capacity",
                               "message": "prompt needs 900 pages, pool has 512"}


def test_output_records_are_lines_and_resume_reports_done(tmp_path):
    out = tmp_path / "out.jsonl"
    bad = BatchItem(line_no=2, error="batch.jsonl line 2: invalid JSON")
    with BatchOutput(out, fsync=True) as output:
        assert output.done_ids == set() and output.done_lines == set()
        output.write(completion_record(completion_item(), 1, [Choice([3], "x", "stop")], 1, {},
                                       "m"))
        output.write(error_record(bad, bad.error))
        output.write(error_record("req-9", "boom", code="server_error"))
    lines = out.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3 and all(line.endswith(b"\n") for line in lines)
    with BatchOutput(out) as output:
        assert output.done_ids == {"req-4", "req-9"} and output.done_lines == {2}
        assert output.is_done(completion_item()) and output.is_done(bad)
        assert not output.is_done(BatchItem(line_no=3, custom_id="req-5"))
        assert not output.is_done(BatchItem(line_no=4, error="line 4: oops"))


def test_resume_cuts_torn_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    with BatchOutput(out) as output:
        output.write(error_record("a", "x"))
    whole = out.read_bytes()
    out.write_bytes(whole + b'{"id": "batch_req_2", "custom_id": "b", "resp')
    with BatchOutput(out) as output:
        assert output.done_ids == {"a"}
        assert out.read_bytes() == whole
        output.write(error_record("c", "y"))
    assert [json.loads(line)["custom_id"] for line in out.read_bytes().splitlines()] == ["a", "c"]


def test_resume_cuts_invalid_last_line_with_newline(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(json.dumps(error_record("a", "x")).encode() + b"\n" + b"\0\0\0\n")
    with BatchOutput(out) as output:
        assert output.done_ids == {"a"}
    assert out.read_bytes().count(b"\n") == 1


def test_corrupt_middle_line_refuses(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_bytes(b"garbage\n" + json.dumps(error_record("a", "x")).encode() + b"\n")
    with pytest.raises(BatchOutputError, match="out.jsonl line 1"):
        BatchOutput(out)
    out.write_bytes(b"")
    BatchOutput(out).close()  # the failed open released its lock


HOLDER = textwrap.dedent("""
    import sys
    from mpiserve.batch.output_file import BatchOutput
    output = BatchOutput(sys.argv[1])
    print("locked", flush=True)
    sys.stdin.read()
""")


def start_holder(out):
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)
    assert holder.stdout.readline() == "locked\n"
    return holder


@pytest.mark.timeout(60)
def test_second_run_on_same_output_refuses(tmp_path):
    out = tmp_path / "out.jsonl"
    holder = start_holder(out)
    try:
        with pytest.raises(BatchOutputError, match="out.jsonl is being written by another run"):
            BatchOutput(out)
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0
    BatchOutput(out).close()


@pytest.mark.timeout(60)
def test_killed_run_releases_lock(tmp_path):
    out = tmp_path / "out.jsonl"
    holder = start_holder(out)
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=30)
    assert Path(f"{out}.lock").exists()            # stale, but no longer locked
    with BatchOutput(out) as output:
        output.write(error_record("a", "x"))
    assert out.read_bytes().count(b"\n") == 1
    assert not Path(f"{out}.lock").exists()


def test_lock_file_removed_under_a_late_locker_is_noticed(tmp_path):
    """A run that opened the lock file just before its owner closed (and removed) it holds
    a nameless file; it must see that and lock the path afresh."""
    out = tmp_path / "out.jsonl"
    first = BatchOutput(out)
    late = open(f"{out}.lock", "a")
    first.close()
    assert not _still_named(late, f"{out}.lock")
    late.close()
    with BatchOutput(out):
        assert Path(f"{out}.lock").exists()


def test_same_process_cannot_open_twice(tmp_path):
    with BatchOutput(tmp_path / "out.jsonl"):
        with pytest.raises(BatchOutputError):
            BatchOutput(tmp_path / "out.jsonl")

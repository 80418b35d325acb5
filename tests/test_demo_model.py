import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mpiserve.model import demo_model
from mpiserve.model.checkpoint import load_checkpoint
from mpiserve.model.demo_model import demo_model_dir
from mpiserve.model.model_cache import cache_root
from mpiserve.model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
FILES = ["config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
         "tokenizer_config.json"]


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MPISERVE_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("MPISERVE_CACHE")
    assert cache_root() == tmp_path / "xdg" / "mpiserve"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "mpiserve"


def test_demo_dir_is_a_versioned_folder_of_the_session_cache(demo_dir, mpiserve_cache):
    assert demo_dir == mpiserve_cache / demo_model.DEMO_NAME
    assert sorted(p.name for p in demo_dir.iterdir()) == FILES
    assert demo_model_dir() == demo_dir


def test_demo_checkpoint_contents(demo_dir):
    config, weights = load_checkpoint(demo_dir)
    assert (config.model_type, config.hidden_size, config.num_layers) == ("llama", 256, 4)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (8, 4, 32)
    assert (config.intermediate_size, config.max_position_embeddings) == (688, 4096)
    assert (config.rope_theta, config.rope_scaling) == (1e4, None)
    assert not config.tie_word_embeddings
    assert (config.bos_token_id, config.eos_token_ids, config.torch_dtype) == (0, (1,), "float32")
    assert torch.equal(weights["model.norm.weight"], torch.ones(256))
    assert abs(weights["lm_head.weight"].std().item() - 0.02) < 1e-3
    generation = json.loads((demo_dir / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (0, 1)


def test_demo_tokenizer(demo_dir):
    tokenizer = Tokenizer.from_dir(demo_dir)
    assert tokenizer.vocab_size == 2048
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|user|>", "<|assistant|>", "<|system|>"]
    assert [tokenizer.backend.token_to_id(t) for t in special] == [0, 1, 2, 3, 4]
    text = "Alice wrote a quiet poem near the river, 2024 times!"
    ids = tokenizer.encode(text)
    assert ids[0] == 0 and len(ids) < len(text) // 2
    assert tokenizer.decode(ids) == text
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert prompt == "<|begin_of_text|><|user|>\nHi<|end_of_text|><|assistant|>\n"


def test_transformers_loads_the_demo_model(demo_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(demo_dir)
    _, weights = load_checkpoint(demo_dir)
    state = model.state_dict()
    assert set(state) == set(weights)
    assert all(torch.equal(state[name], weights[name]) for name in weights)
    hf = AutoTokenizer.from_pretrained(demo_dir)
    text = "Hello! How can I help you today?"
    assert hf.encode(text) == Tokenizer.from_dir(demo_dir).encode(text)


def test_concurrent_first_use_builds_identical_files_once(demo_dir, tmp_path):
    """Three processes race to build into an empty cache; all agree, nothing is left over, and
    the files are byte-identical to this session's build (a different process and cache)."""
    env = {**os.environ, "MPISERVE_CACHE": str(tmp_path),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    code = "from mpiserve.model.demo_model import demo_model_dir; print(demo_model_dir())"
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                              text=True) for _ in range(3)]
    outputs = {proc.communicate(timeout=120)[0].strip() for proc in procs}
    assert all(proc.returncode == 0 for proc in procs)
    assert outputs == {str(tmp_path / demo_model.DEMO_NAME)}
    assert [p.name for p in tmp_path.iterdir()] == [demo_model.DEMO_NAME]
    built = tmp_path / demo_model.DEMO_NAME
    for name in FILES:
        assert (built / name).read_bytes() == (demo_dir / name).read_bytes(), name


def test_losing_the_race_discards_the_staging_copy(monkeypatch, tmp_path):
    target = tmp_path / demo_model.DEMO_NAME
    real_write = demo_model.write_demo_model

    def write_while_another_process_wins(directory):
        real_write(directory)
        target.mkdir()
        (target / "config.json").write_text("{}")

    monkeypatch.setenv("MPISERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(demo_model, "write_demo_model", write_while_another_process_wins)
    assert demo_model_dir() == target
    assert [p.name for p in tmp_path.iterdir()] == [demo_model.DEMO_NAME]
    assert [p.name for p in target.iterdir()] == ["config.json"]

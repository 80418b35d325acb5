import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mpiserve.errors import CheckpointError
from mpiserve.model.checkpoint import (
    check_weights,
    expected_tensor_names,
    load_checkpoint,
    load_weights,
    resolve_dtype,
)
from mpiserve.model.model_config import ModelConfig

ARCHS = ["llama", "llama3", "llama_tied", "mistral", "qwen2", "qwen2_tied", "qwen3", "qwen3_tied"]


def copy_model(source: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(source, tmp_path / "model"))


def rewrite(path: Path, change) -> None:
    """Apply `change` to the tensors of a safetensors file and save it back."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_json(path: Path, **fields) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_exactly_the_tensors_transformers_uses(tiny_hf_model, arch):
    from transformers import AutoModelForCausalLM
    path = tiny_hf_model(arch)
    config, weights = load_checkpoint(path)
    state = AutoModelForCausalLM.from_pretrained(path).state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert list(weights) == expected_tensor_names(config)
    assert set(weights) == set(state)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state[name]), name


def test_expected_names_follow_config_flags(tiny_hf_model):
    qwen2 = ModelConfig.from_dir(tiny_hf_model("qwen2"))
    qwen3 = ModelConfig.from_dir(tiny_hf_model("qwen3_tied"))
    assert "model.layers.1.self_attn.k_proj.bias" in expected_tensor_names(qwen2)
    assert "model.layers.1.self_attn.q_norm.weight" in expected_tensor_names(qwen3)
    assert "lm_head.weight" not in expected_tensor_names(qwen3)
    assert "model.layers.0.self_attn.o_proj.bias" not in expected_tensor_names(qwen2)


def test_sharded_checkpoint_loads_like_single_file(tiny_hf_model):
    sharded = tiny_hf_model("qwen2", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    _, expected = load_checkpoint(tiny_hf_model("qwen2"))
    _, weights = load_checkpoint(sharded)
    assert list(weights) == list(expected)
    assert all(torch.equal(weights[name], expected[name]) for name in expected)


def test_dtype_defaults_to_the_checkpoints_and_can_be_overridden(tiny_hf_model):
    bf16 = tiny_hf_model("llama", dtype="bfloat16")
    config, weights = load_checkpoint(bf16)
    assert config.torch_dtype == "bfloat16"
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    _, weights = load_checkpoint(bf16, torch.float32)
    assert {t.dtype for t in weights.values()} == {torch.float32}
    _, weights = load_checkpoint(tiny_hf_model("llama"), "float16")
    assert {t.dtype for t in weights.values()} == {torch.float16}


def test_resolve_dtype():
    assert resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="float64"):
        resolve_dtype("float64")


def test_extra_tensors_are_ignored(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    rewrite(path / "model.safetensors", lambda t: t.update({
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8),
        "model.rotary_emb.inv_freq": torch.ones(8)}))
    _, weights = load_checkpoint(path)
    assert "model.rotary_emb.inv_freq" not in weights


def test_tied_model_ignores_a_saved_lm_head(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("qwen3_tied"), tmp_path)
    rewrite(path / "model.safetensors",
            lambda t: t.update({"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    _, weights = load_checkpoint(path)
    assert "lm_head.weight" not in weights


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="no-such-model"):
        load_checkpoint(tmp_path / "no-such-model")


@pytest.mark.parametrize("pickle_name", ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin",
                                         "consolidated.pt"])
def test_pickled_weights_are_refused_not_unpickled(tiny_hf_model, tmp_path, pickle_name):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    (path / "model.safetensors").unlink()
    (path / pickle_name).write_bytes(b"not even a pickle: must never be opened")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert pickle_name in message and "never unpickles" in message
    assert "save_pretrained" in message and "safe_serialization=True" in message


def test_no_weights_at_all(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    (path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights found.*model\.safetensors"):
        load_checkpoint(path)


@pytest.mark.parametrize("name", ["model.layers.1.mlp.up_proj.weight", "lm_head.weight",
                                  "model.layers.0.self_attn.v_proj.bias"])
def test_missing_tensor_is_named_with_the_files_searched(tiny_hf_model, tmp_path, name):
    path = copy_model(tiny_hf_model("qwen2"), tmp_path)
    rewrite(path / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert name in str(info.value) and "searched model.safetensors" in str(info.value)


def test_missing_tensor_in_a_sharded_checkpoint_lists_every_shard(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("qwen2", max_shard_size="40KB"), tmp_path)
    shard = path / json.loads((path / "model.safetensors.index.json").read_text())[
        "weight_map"]["model.norm.weight"]
    rewrite(shard, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "'model.norm.weight'" in message
    assert all(p.name in message for p in path.glob("model-*.safetensors"))


def test_shape_mismatch_names_tensor_file_and_both_shapes(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    edit_json(path / "config.json", intermediate_size=96)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "model.safetensors" in message and "mlp.gate_proj.weight" in message
    assert "[128, 64]" in message and "[96, 64]" in message


def test_head_dim_mismatch_is_caught(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("qwen3"), tmp_path)
    edit_json(path / "config.json", head_dim=16)
    with pytest.raises(CheckpointError, match=r"q_proj\.weight.*\[128, 64\].*\[64, 64\]"):
        load_checkpoint(path)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_file_is_named(tiny_hf_model, tmp_path, damage):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    weights = path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncate": data[:len(data) // 2], "garbage": b"\x07" * 64,
                         "empty": b""}[damage])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(path)


def test_truncated_shard_is_named(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("llama", max_shard_size="40KB"), tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        load_checkpoint(path)


def test_index_naming_a_missing_shard(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("llama", max_shard_size="40KB"), tmp_path)
    shard = sorted(path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "model.safetensors.index.json" in str(info.value) and shard.name in str(info.value)


@pytest.mark.parametrize("content, field", [("{not json", "not valid JSON"),
                                            ('{"metadata": {}}', "weight_map"),
                                            ('{"weight_map": {"a": 3}}', "weight_map")])
def test_broken_index_is_named(tiny_hf_model, tmp_path, content, field):
    path = copy_model(tiny_hf_model("llama", max_shard_size="40KB"), tmp_path)
    (path / "model.safetensors.index.json").write_text(content)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "model.safetensors.index.json" in str(info.value) and field in str(info.value)


def test_unexpected_layer_parameter_is_refused(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    rewrite(path / "model.safetensors",
            lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": torch.zeros(64)}))
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*o_proj\.bias"):
        load_checkpoint(path)


def test_quantized_tensor_is_refused(tiny_hf_model, tmp_path):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    rewrite(path / "model.safetensors",
            lambda t: t.update({"model.norm.weight": torch.ones(64, dtype=torch.int8)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight.*I8"):
        load_checkpoint(path)


def test_load_weights_with_a_given_config(tiny_hf_model):
    path = tiny_hf_model("mistral")
    config = ModelConfig.from_dir(path)
    weights = load_weights(path, config, torch.bfloat16)
    assert weights["model.embed_tokens.weight"].shape == (2048, 64)
    assert weights["model.norm.weight"].dtype == torch.bfloat16


def test_sliding_window_bounds_the_context():
    from mpiserve.model.model_config import ModelConfig
    base = {"vocab_size": 10, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 8192}
    mistral = ModelConfig.from_dict({**base, "model_type": "mistral", "sliding_window": 4096})
    assert mistral.context_limit == 4096
    qwen_off = ModelConfig.from_dict({**base, "model_type": "qwen2", "sliding_window": 4096})
    assert qwen_off.context_limit == 8192
    qwen_on = ModelConfig.from_dict({**base, "model_type": "qwen2", "sliding_window": 1024,
                                     "use_sliding_window": True})
    assert qwen_on.context_limit == 1024


@pytest.mark.parametrize("cut", [1, 4096])
def test_check_weights_finds_a_cut_off_file_from_headers(tiny_hf_model, tmp_path, cut):
    path = copy_model(tiny_hf_model("llama"), tmp_path)
    config = ModelConfig.from_dir(path)
    check_weights(path, config)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-cut])
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        check_weights(path, config)

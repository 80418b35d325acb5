"""GGUF files written here with gguf's GGUFWriter from tiny Hugging Face checkpoints load to
the same tensors (F32 exactly; quantized types as the same quantize/dequantize round trip)."""

import numpy as np
import pytest
import torch

from mpiserve.checkpoint import load_checkpoint
from mpiserve.errors import CheckpointError
from mpiserve.gguf_checkpoint import load_gguf_checkpoint, unpermute_rotary_rows

gguf = pytest.importorskip("gguf")

GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf_name: str) -> str:
    stem, _, kind = hf_name.rpartition(".")
    if stem in TOP:
        return f"{TOP[stem]}.{kind}"
    _, _, layer, rest = stem.split(".", 3)
    return f"blk.{layer}.{GGUF_NAMES[rest]}.{kind}"


def permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert order: each head's two rotary halves interleaved as pairs."""
    rows = weight.shape[0]
    return (weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_gguf(path, config, weights, qtype):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_ids[0])
    expected = {}
    for name, tensor in weights.items():
        data = tensor.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            data = permute_rotary_rows(data, heads)
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_name(name), packed, raw_dtype=qtype)
            data = gguf.quants.dequantize(packed, qtype)
        else:
            writer.add_tensor(gguf_name(name), data)
        expected[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_gguf_loads_the_tensors_it_was_written_from(tiny_hf_model, tmp_path, qtype):
    config, weights = load_checkpoint(tiny_hf_model("llama"))
    path = tmp_path / "tiny.gguf"
    written = write_gguf(path, config, weights, getattr(gguf.GGMLQuantizationType, qtype))
    loaded_config, loaded = load_gguf_checkpoint(path, torch.float32)
    assert loaded_config.num_kv_heads == config.num_kv_heads
    assert loaded_config.vocab_size == config.vocab_size
    assert set(loaded) == set(weights)
    for name, tensor in loaded.items():
        reference = torch.from_numpy(written[name]).reshape(tensor.shape).float()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            reference = unpermute_rotary_rows(reference, heads)
        assert torch.equal(tensor, reference), name
    if qtype == "F32":
        for name, tensor in loaded.items():
            assert torch.equal(tensor, weights[name]), name


def test_missing_file_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nothing.gguf"):
        load_gguf_checkpoint(tmp_path / "nothing.gguf")


def test_load_checkpoint_dispatches_on_the_gguf_suffix(tiny_hf_model, tmp_path):
    config, weights = load_checkpoint(tiny_hf_model("llama"))
    path = tmp_path / "tiny.gguf"
    write_gguf(path, config, weights, gguf.GGMLQuantizationType.F32)
    _, loaded = load_checkpoint(path, "bfloat16")
    assert all(tensor.dtype == torch.bfloat16 for tensor in loaded.values())
    assert torch.equal(loaded["lm_head.weight"], weights["lm_head.weight"].bfloat16())

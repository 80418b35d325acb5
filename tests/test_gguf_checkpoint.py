"""GGUF files written here with gguf's GGUFWriter from tiny Hugging Face checkpoints load to
the same tensors (F32 exactly; quantized types as the same quantize/dequantize round trip)."""

import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_gguf_tokenizer import add_tokenizer_metadata

from mpiserve import LLM, SamplingParams
from mpiserve.errors import CheckpointError
from mpiserve.model.checkpoint import load_checkpoint
from mpiserve.model.gguf_checkpoint import load_gguf_checkpoint, unpermute_rotary_rows

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


def write_gguf(path, config, weights, qtype, tokenizer_dir=None):
    """`weights` as a GGUF file (quantized to `qtype` where 2-D), with the tokenizer of
    `tokenizer_dir` when given; returns each tensor as written (permuted, dequantized)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_heads)
    writer.add_head_count_kv(config.num_kv_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    if tokenizer_dir is None:
        writer.add_bos_token_id(config.bos_token_id)
        writer.add_eos_token_id(config.eos_token_ids[0])
    else:
        add_tokenizer_metadata(writer, tokenizer_dir)
    expected = {}
    for name, tensor in weights.items():
        data = tensor.numpy()
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            data = permute_rotary_rows(data, heads)
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        # rows that do not split into whole blocks stay F32, as llama.cpp's converter keeps them
        if data.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32 and data.shape[1] % block == 0:
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
        assert torch.equal(tensor, hf_order(name, written[name], tensor.shape, config)), name
    if qtype == "F32":
        for name, tensor in loaded.items():
            assert torch.equal(tensor, weights[name]), name


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0"])
def test_gguf_model_generates_what_its_dequantized_safetensors_twin_does(demo_dir, tmp_path,
                                                                       qtype):
    """The demo model (weights and tokenizer) as one GGUF file, against a safetensors copy of
    the same dequantized weights: same greedy tokens for text prompts."""
    config, weights = load_checkpoint(demo_dir)
    path = tmp_path / "demo.gguf"
    written = write_gguf(path, config, weights, getattr(gguf.GGMLQuantizationType, qtype),
                         tokenizer_dir=demo_dir)
    twin = tmp_path / "twin"
    shutil.copytree(demo_dir, twin)
    save_file({name: hf_order(name, written[name], weights[name].shape, config)
               for name in weights}, str(twin / "model.safetensors"))
    prompts = ["The capital of France is", "1 2 3 4 5 6", "héllo wörld, ñandú"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    ours, theirs = (LLM(str(model), page_size=16, num_pages=64).generate(prompts, params)
                    for model in (path, twin))
    assert [o.token_ids for o in ours] == [o.token_ids for o in theirs]


def hf_order(name, data, shape, config) -> torch.Tensor:
    """A tensor as write_gguf wrote it, back in the Hugging Face shape and row order."""
    tensor = torch.from_numpy(np.ascontiguousarray(data)).reshape(shape).float()
    if name.endswith(("q_proj.weight", "k_proj.weight")):
        heads = config.num_heads if "q_proj" in name else config.num_kv_heads
        tensor = unpermute_rotary_rows(tensor, heads)
    return tensor.contiguous()


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


@pytest.mark.parametrize("keep", [0.3, 0.9, 0.999])
def test_truncated_file_is_a_checkpoint_error_naming_it(tiny_hf_model, tmp_path, keep):
    config, weights = load_checkpoint(tiny_hf_model("llama"))
    path = tmp_path / "cut.gguf"
    write_gguf(path, config, weights, gguf.GGMLQuantizationType.Q8_0)
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])
    with pytest.raises(CheckpointError, match="cut.gguf"):
        load_gguf_checkpoint(path)

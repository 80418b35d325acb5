"""The built-in demo model: a small Llama checkpoint generated on this machine, never downloaded.

The first call builds it into the cache (model_cache) in a few seconds (random weights from a
fixed seed and a byte-level BPE tokenizer trained on sentences composed here), so every build is
byte-identical.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as BackendTokenizer

from .checkpoint import expected_tensor_shapes
from .model_cache import cached_checkpoint
from .model_config import ModelConfig

DEMO_NAME = "demo-llama-v1"
SEED = 20240611
VOCAB_SIZE = 2048
BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
SPECIAL_TOKENS = [BOS, EOS, "<|user|>", "<|assistant|>", "<|system|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' ~ message['role'] ~ '; use system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' ~ message['role'] ~ '|>\\n' ~ message['content'] ~ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
# Llama-3-style pre-tokenization: contractions, words, 1-3 digit numbers, punctuation, spaces.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "dtype": "float32",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 1,
}

_WORD_LISTS = {
    "noun": """cat dog bird fish horse river mountain forest city village garden house window
        door table chair book letter story song poem teacher student doctor farmer artist
        engineer child friend family neighbor king queen ship train car bicycle road bridge
        tower castle island ocean lake cloud storm rain snow wind sun moon star planet
        computer program network server message signal machine robot clock lamp key box
        bottle cup bread apple orange cheese soup coffee tea market shop school library
        museum hospital office kitchen room street park field valley desert winter summer
        morning evening night question answer idea plan problem reason voice word number
        paper pencil picture camera mirror blanket pillow basket ladder hammer rope candle
        engine wheel harbor meadow orchard canyon glacier volcano jungle prairie swamp
        journey adventure festival holiday concert lesson history science language music
        theory memory dream secret treasure puzzle riddle signal pattern surface shadow
        captain sailor pilot scholar merchant traveler guardian wizard dragon giant rabbit
        turtle eagle wolf bear mouse spider butterfly flower leaf branch stone crystal""",
    "verb": """see find build open close carry follow watch help answer write read paint
        sing visit explore remember forget cross climb reach move send receive count
        measure compute learn teach clean cook bring leave keep share discover imagine
        describe improve protect collect deliver arrange""",
    "past": """saw found built opened closed carried followed watched helped answered wrote
        read painted sang visited explored remembered forgot crossed climbed reached moved
        sent received counted measured computed learned taught cleaned cooked brought left
        kept shared discovered imagined described improved protected collected delivered
        arranged""",
    "adj": """small large old young quiet loud bright dark warm cold quick slow happy sad
        red blue green yellow golden silver gentle brave clever strange simple careful
        ancient modern empty busy distant nearby hidden famous tiny huge curious patient
        honest polite proud lucky fragile heavy narrow wide smooth rough silent noisy
        frozen wooden crowded peaceful mysterious wonderful""",
    "adv": """quickly slowly quietly carefully happily suddenly always often never rarely
        together again already soon""",
    "prep": "near under over behind beside across through into from toward around inside",
    "name": """Alice Bruno Chen Dana Emil Farah Gita Hugo Ines Jonas Kira Leo Maya Nils Omar
        Petra Quinn Rosa Sami Tara""",
}
_WORDS = {kind: words.split() for kind, words in _WORD_LISTS.items()}
_PATTERNS = [
    "The {adj} {noun} {past} the {noun} {prep} the {noun}.",
    "{name} {past} a {adj} {noun} {adv}.",
    "Why did the {noun} {verb} the {noun}?",
    "There are {num} {noun}s {prep} the {adj} {noun}.",
    "{name} said: \"I will {verb} the {noun} {adv}.\"",
    "In {year}, {name} and {name} {past} {num} {adj} {noun}s.",
    "Can you {verb} the {noun}? It is {adj}, isn't it?",
    "The {noun}'s {noun} was {adj} and {adj}; we {past} it {adv}.",
    "Step {num}: {verb} the {noun}, then {verb} the {noun}.",
    "Hello! How can I {verb} you today?",
]


def demo_model_dir() -> Path:
    """Directory of the demo checkpoint in the cache, built on first use."""
    return cached_checkpoint(DEMO_NAME, write_demo_model)


def write_demo_model(directory: Path) -> None:
    """Write the complete demo checkpoint into the existing `directory`."""
    _write_json(directory / "config.json", CONFIG)
    _write_json(directory / "generation_config.json",
                {"bos_token_id": CONFIG["bos_token_id"], "eos_token_id": CONFIG["eos_token_id"]})
    save_file(_demo_weights(ModelConfig.from_dict(CONFIG)), str(directory / "model.safetensors"),
              metadata={"format": "pt"})
    _train_tokenizer().save(str(directory / "tokenizer.json"))
    _write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "add_bos_token": True,
        "clean_up_tokenization_spaces": False,
        "model_max_length": CONFIG["max_position_embeddings"],
        "chat_template": CHAT_TEMPLATE,
    })


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _demo_weights(config: ModelConfig) -> dict[str, torch.Tensor]:
    """Norm weights are ones; matrices are N(0, 0.02) from a fixed seed, in a fixed order."""
    generator = torch.Generator().manual_seed(SEED)
    return {name: torch.ones(shape) if len(shape) == 1
            else torch.randn(shape, generator=generator) * CONFIG["initializer_range"]
            for name, shape in expected_tensor_shapes(config).items()}


def _train_tokenizer() -> BackendTokenizer:
    tokenizer = BackendTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator(_demo_corpus(), trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1",
        special_tokens=[(BOS, tokenizer.token_to_id(BOS))])
    return tokenizer


def _demo_corpus(num_paragraphs: int = 3000) -> list[str]:
    """Paragraphs of sentences composed from the word lists above with a fixed seed."""
    rng = random.Random(SEED)
    return [_paragraph(rng) for _ in range(num_paragraphs)]


def _paragraph(rng: random.Random) -> str:
    sentences = [_fill(rng.choice(_PATTERNS), rng) for _ in range(rng.randint(1, 4))]
    return rng.choice([" ", "\n"]).join(sentences)


def _fill(pattern: str, rng: random.Random) -> str:
    return re.sub(r"\{(\w+)\}", lambda slot: _word(slot.group(1), rng), pattern)


def _word(kind: str, rng: random.Random) -> str:
    if kind == "num":
        return str(rng.choice([rng.randint(2, 12), rng.randint(13, 999), rng.randint(1000, 99999)]))
    if kind == "year":
        return str(rng.randint(1800, 2030))
    return rng.choice(_WORDS[kind])

"""Named model configs, usable wherever a config.json path is accepted."""
from __future__ import annotations

import torch

from llamazoo.model.llama import LlamaConfig, LlamaForCausalLM

_LLAMA2 = dict(vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
_LLAMA3 = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, bos_token_id=128000)
_LLAMA31_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                     original_max_position_embeddings=8192)

NAMED_CONFIGS: dict[str, dict] = {
    "llama2-7b": dict(_LLAMA2, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32),
    "llama2-13b": dict(_LLAMA2, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40),
    "llama2-70b": dict(_LLAMA2, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                       num_attention_heads=64, num_key_value_heads=8),
    "llama3-8b": dict(_LLAMA3, max_position_embeddings=8192, rope_theta=500000.0, eos_token_id=128001),
    "llama3.1-8b": dict(_LLAMA3, max_position_embeddings=131072, rope_theta=500000.0,
                        rope_scaling=_LLAMA31_ROPE, eos_token_id=[128001, 128008, 128009]),
    "llama3.1-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                         num_attention_heads=64, max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=_LLAMA31_ROPE, eos_token_id=[128001, 128008, 128009]),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         initializer_range=0.041666666666666664, bos_token_id=1, eos_token_id=2, pad_token_id=2),
    # Tiny configs for tests and smoke runs.
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256),
    "tiny-gqa": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
}

DESCRIPTIONS = {
    "llama2-7b": "Llama-2-7b", "llama2-13b": "Llama-2-13b", "llama2-70b": "Llama-2-70b",
    "llama3-8b": "Meta-Llama-3-8B", "llama3.1-8b": "Llama-3.1-8B", "llama3.1-70b": "Llama-3.1-70B",
    "smollm2-135m": "SmolLM2-135M(-Instruct) architecture", "tiny": "tiny MHA test model",
    "tiny-gqa": "tiny GQA test model",
}


def named_config(name: str) -> LlamaConfig:
    try:
        return LlamaConfig(**NAMED_CONFIGS[name])
    except KeyError:
        raise KeyError(f"unknown model name {name!r}; known: {', '.join(NAMED_CONFIGS)}") from None


def count_parameters(cfg: LlamaConfig) -> int:
    """Counts parameters by building the model on the meta device (no memory), tied weights once."""
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return sum(p.numel() for p in model.parameters())

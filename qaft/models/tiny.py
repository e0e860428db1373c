"""``tiny-llama``: a deterministic random two-layer LLaMA with SmolLM2's tokenizer, for fast tests of quantizers
and training loops where the model's knowledge does not matter."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TINY_LLAMA = "tiny-llama"


def tiny_llama_config(vocab_size: int = 49152) -> LlamaConfig:
    """Widths divisible by 64 so that group sizes 32 and 64 apply to every linear layer."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rms_norm_eps=1e-5,
    )


def build_tiny_llama(vocab_size: int = 49152, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Same random weights on every call: the global RNG is forked so callers' seeds are untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size))
    return model.to(dtype)

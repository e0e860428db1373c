"""``tiny-llama`` / ``tiny-gpt2``: deterministic random two-layer models with SmolLM2's tokenizer, for fast tests of
quantizers and training loops where the model's knowledge does not matter. ``tiny-gpt2`` is the non-LLaMA layout
(``Conv1D`` layers with transposed weights, one fused ``c_attn``), e.g. for the DDP test."""
from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM, PretrainedConfig

TINY_LLAMA = "tiny-llama"
TINY_GPT2 = "tiny-gpt2"


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


def tiny_gpt2_config(vocab_size: int = 49152) -> GPT2Config:
    """GPT-2 at the tiny LLaMA's widths (64 wide, MLP 256: GPT-2's fixed 4x)."""
    return GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=2048,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)  # the tiny LLaMA's (LlamaConfig's)


TINY_CONFIGS = {TINY_LLAMA: tiny_llama_config, TINY_GPT2: tiny_gpt2_config}


def tiny_config(name: str, vocab_size: int = 49152) -> PretrainedConfig:
    """The config of the tiny built-in model ``name`` (one of :data:`TINY_CONFIGS`)."""
    return TINY_CONFIGS[name](vocab_size)


def build_tiny(name: str, vocab_size: int = 49152, seed: int = 0,
               dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The tiny built-in model ``name``; same random weights on every call, the callers' RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_config(name, vocab_size))
    return model.to(dtype)


def build_tiny_llama(vocab_size: int = 49152, seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Same random weights on every call: the global RNG is forked so callers' seeds are untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(tiny_llama_config(vocab_size))
    return model.to(dtype)

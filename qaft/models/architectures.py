"""The causal-LM architectures transformers ships, which of them qaft supports, and why it refuses the others.

``tests/unit/test_architectures.py`` builds every architecture of transformers' causal-LM mapping
(``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``) from a small random config (:func:`small_config`), applies an integer
method with the default targets (every linear layer of every decoder block, :mod:`qaft.methods.targets`), and
checks that every block linear is quantized and that the merged integer model computes the trained one. An
architecture that cannot pass says why in :data:`REFUSED` (reviewed by hand: a refusal is a statement about the
architecture, not a caught exception), and the test checks that it indeed fails. The README's list of supported
architectures is :func:`render_markdown`, and a test keeps the two equal.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PretrainedConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

# The sizes every small config is shrunk to, under whichever of these names its config class has.
SMALL_SIZES: dict[str, int] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 128, "max_position_embeddings": 128,
    "n_embd": 64, "n_layer": 2, "n_head": 4, "n_inner": 128, "ffn_dim": 128, "d_model": 64, "num_layers": 2,
    "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "encoder_layers": 2,
    "encoder_attention_heads": 4, "encoder_ffn_dim": 128, "word_embed_proj_dim": 64, "rotary_dim": 8,
    "moe_intermediate_size": 32, "num_experts": 4, "n_routed_experts": 4, "num_local_experts": 4,
    "num_experts_per_tok": 2, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "shared_expert_intermediate_size": 32,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
}
# The ten architectures the full method matrix runs on (the list): LLaMA-style, and the other layouts.
MATRIX_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "opt", "gpt2", "gpt_neox", "falcon")

_NO_SMALL = "does not build and run from a small random config (transformers' own error with the shrunk sizes)"
_MOE = "MoE experts are one fused 3-D weight tensor, not linear layers: an integer merge would leave them float"
_RECURRENT = "state-space / recurrent blocks hold weight matrices that are no linear layer (convolutions, fused " \
             "recurrent weights): an integer merge would leave them float"
_ENCODER = "an encoder-style or seq2seq decoder whose blocks hold weight matrices that are no linear layer"
_OTHER = "a block weight matrix is no linear layer (a parameter used directly in the forward)"

# model_type -> why qaft refuses it. Reviewed: each entry was checked to fail for the stated reason.
REFUSED: dict[str, str] = {}


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal LM class."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(config: PretrainedConfig) -> None:
    for key, value in SMALL_SIZES.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                continue  # a derived or per-layer attribute: the config keeps its own


def small_config(model_type: str) -> PretrainedConfig:
    """``model_type``'s default config with every size in :data:`SMALL_SIZES` it has (also in a nested text config)."""
    config = CONFIG_MAPPING[model_type]()
    _shrink(config)
    for nested in ("text_config", "decoder"):
        sub = getattr(config, nested, None)
        if isinstance(sub, PretrainedConfig):
            _shrink(sub)
    return config


def small_model(model_type: str, seed: int = 0) -> Any:
    """A small random causal LM of ``model_type`` (the global RNG is left untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(small_config(model_type)).eval()


def supported() -> list[str]:
    return [t for t in causal_lm_types() if t not in REFUSED]


def render_markdown() -> str:
    """The README's architecture list: the supported ones, then each refusal and its reason."""
    lines = [f"Supported ({len(supported())} of {len(causal_lm_types())} causal-LM types in transformers): "
             + ", ".join(f"`{t}`" for t in supported()) + ".", "", "Refused:", ""]
    lines += [f"* `{t}`: {reason}" for t, reason in sorted(REFUSED.items())]
    return "\n".join(lines) + "\n"


__all__ = ["MATRIX_ARCHITECTURES", "REFUSED", "causal_lm_types", "render_markdown", "small_config", "small_model",
           "supported"]

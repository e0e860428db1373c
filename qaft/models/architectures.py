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

from dataclasses import dataclass
from typing import Any

import torch
import transformers
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
    "v_head_dim": 16, "shared_expert_intermediate_size": 32, "ffn_hidden_size": 128, "dim_model": 64, "dim_ff": 128,
    "dim_head": 16, "num_heads": 4, "image_size": 32, "patch_size": 8,
    "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 2,
}
# The ten architectures the full method matrix runs on (the list): LLaMA-style, and the other layouts.
MATRIX_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "opt", "gpt2", "gpt_neox", "falcon")

BUILD, TARGETS, NOT_TRIED = "build", "targets", "not tried"  # where a refused architecture stops


@dataclass(frozen=True)
class Refusal:
    """Why an architecture is not supported, and where that shows: ``BUILD`` (transformers cannot build or run it
    from the small config), ``TARGETS`` (qaft refuses an integer method: a block weight is no linear layer), or
    ``NOT_TRIED`` (too slow to build in a unit test)."""

    reason: str
    stage: str


_NO_SMALL = "does not build and run from the small random config: "
_MOE = "MoE experts are fused 3-D weight tensors (and routers bare parameters), not linear layers: an integer " \
       "merge would leave them float"
_RECURRENT = "state-space / convolution mixers (Mamba-style Conv1d, fused recurrent weights) are no linear layers: " \
             "an integer merge would leave them float"
_HYBRID = _NO_SMALL + "a hybrid linear-attention model whose cache transformers' mask code rejects (get_mask_sizes)"
_MLA = _NO_SMALL + "multi-head latent attention whose rotary / head sizes do not fit the generic small sizes"
_PER_LAYER = _NO_SMALL + "its attention sizes are per-layer attributes, with no single value to shrink"
_SLOW = "its sub-model configs (patcher, local encoder / decoder, global transformer) are not shrunk by the generic " \
        "small config: a random model takes over 20 s to build"

# model_type -> why qaft refuses it. Reviewed: each entry is checked by tests/unit/test_architectures.py to fail
# at its stage (the reasons in BUILD quote transformers' own error with the small config).
REFUSED: dict[str, Refusal] = {
    "afmoe": Refusal(_MOE, TARGETS),
    "aria_text": Refusal(_MOE, TARGETS),
    "axk1": Refusal(_MLA, BUILD),
    "axk2": Refusal(_MLA, BUILD),
    "bailing_hybrid": Refusal(_HYBRID, BUILD),
    "bamba": Refusal(_HYBRID, BUILD),
    "blt": Refusal(_SLOW, NOT_TRIED),
    "cohere2_moe": Refusal(_MOE, TARGETS),
    "cohere_compass_text": Refusal(_NO_SMALL + "'full_attention'", BUILD),
    "dbrx": Refusal(_NO_SMALL + "'DbrxAttentionConfig' object has no attribute 'rope_theta'", BUILD),
    "deepseek_v2": Refusal(_MLA, BUILD),
    "deepseek_v3": Refusal(_MLA, BUILD),
    "deepseek_v32": Refusal(_MLA, BUILD),
    "deepseek_v4": Refusal(_MOE, TARGETS),
    "dots1": Refusal(_NO_SMALL + "unsupported operand type(s) for *: 'int' and 'NoneType'", BUILD),
    "dots3_note": Refusal(_PER_LAYER, BUILD),
    "dots3_note_text": Refusal(_PER_LAYER, BUILD),
    "ernie4_5_moe": Refusal(_MOE, TARGETS),
    "ergo": Refusal(_MOE, TARGETS),
    "exaone_moe": Refusal(_MOE, TARGETS),
    "falcon_h1": Refusal(_RECURRENT, TARGETS),
    "falcon_mamba": Refusal(_RECURRENT, TARGETS),
    "flex_olmo": Refusal(_MOE, TARGETS),
    "gemma3": Refusal("its vision tower pools with torch's MultiheadAttention, whose projections are bare parameters, "
                      "no linear layers: an integer merge would leave them float", TARGETS),
    "gemma3n": Refusal(_NO_SMALL + "its vision tower needs the timm library, which qaft does not install", BUILD),
    "gemma3n_text": Refusal(_NO_SMALL + "list assignment index out of range", BUILD),
    "gemma4": Refusal(_PER_LAYER, BUILD),
    "gemma4_assistant": Refusal(_NO_SMALL + "the config class's own validation (hidden_size_per_layer_input)", BUILD),
    "gemma4_text": Refusal(_PER_LAYER, BUILD),
    "gemma4_unified": Refusal(_PER_LAYER, BUILD),
    "gemma4_unified_assistant": Refusal(_PER_LAYER, BUILD),
    "gemma4_unified_text": Refusal(_PER_LAYER, BUILD),
    "glm4_moe": Refusal(_MOE, TARGETS),
    "glm4_moe_lite": Refusal(_MOE, TARGETS),
    "glm_moe_dsa": Refusal(_MLA, BUILD),
    "gpt_oss": Refusal(_MOE, TARGETS),
    "granitemoe": Refusal(_MOE, TARGETS),
    "granitemoe_swa": Refusal(_MOE, TARGETS),
    "granitemoehybrid": Refusal(_HYBRID, BUILD),
    "granitemoeshared": Refusal(_MOE, TARGETS),
    "hrm_text": Refusal(_NO_SMALL + "list index out of range", BUILD),
    "hunyuan_v1_moe": Refusal(_MOE, TARGETS),
    "hy_v3": Refusal(_MOE, TARGETS),
    "hy_v4": Refusal(_MLA, BUILD),
    "inkling2_loop_text": Refusal(_RECURRENT, TARGETS),
    "inkling2_text": Refusal(_RECURRENT, TARGETS),
    "inkling_text": Refusal(_RECURRENT, TARGETS),
    "jamba": Refusal(_HYBRID, BUILD),
    "jetmoe": Refusal(_MOE, TARGETS),
    "kimi_linear": Refusal(_HYBRID, BUILD),
    "kolibri1": Refusal(_MOE, TARGETS),
    "laguna": Refusal(_MOE, TARGETS),
    "lara_mini": Refusal(_RECURRENT, TARGETS),
    "lfm3": Refusal(_RECURRENT, TARGETS),
    "lfm2_moe": Refusal(_NO_SMALL + "'NoneType' object is not subscriptable", BUILD),
    "llama4": Refusal(_MOE, TARGETS),
    "llama4_text": Refusal(_MOE, TARGETS),
    "longcat_flash": Refusal(_NO_SMALL + "split_with_sizes expects split_sizes to sum exactly to 192", BUILD),
    "mamba": Refusal(_RECURRENT, TARGETS),
    "mamba2": Refusal(_NO_SMALL + "shape '[1, 8, 4, 16]' is invalid for input of size 1024", BUILD),
    "mellum": Refusal(_MOE, TARGETS),
    "mimo_v2_flash": Refusal(_MOE, TARGETS),
    "minicpm3": Refusal(_MLA, BUILD),
    "minicpm5_moe": Refusal(_MOE, TARGETS),
    "minimax": Refusal(_MOE, TARGETS),
    "minimax_m2": Refusal(_MOE, TARGETS),
    "minimax_m3_vl_text": Refusal(_MOE, TARGETS),
    "mixtral": Refusal(_MOE, TARGETS),
    "musicgen": Refusal(_NO_SMALL + "'MusicgenConfig' object has no attribute 'dropout'", BUILD),
    "musicgen_melody": Refusal(_NO_SMALL + "'MusicgenMelodyConfig' object has no attribute 'dropout'", BUILD),
    "nemotron_h": Refusal(_RECURRENT, TARGETS),
    "olmo_hybrid": Refusal(_HYBRID, BUILD),
    "olmoe": Refusal(_MOE, TARGETS),
    "param2moe": Refusal(_MOE, TARGETS),
    "phimoe": Refusal(_MOE, TARGETS),
    "prophetnet": Refusal(_NO_SMALL + "its layer counts are set per encoder / decoder, not num_hidden_layers", BUILD),
    "qwen2_moe": Refusal(_MOE, TARGETS),
    "qwen3_5": Refusal(_HYBRID, BUILD),
    "qwen3_5_moe": Refusal(_HYBRID, BUILD),
    "qwen3_5_moe_text": Refusal(_HYBRID, BUILD),
    "qwen3_5_text": Refusal(_HYBRID, BUILD),
    "qwen3_moe": Refusal(_MOE, TARGETS),
    "qwen3_next": Refusal(_HYBRID, BUILD),
    "qwen4_exp": Refusal(_NO_SMALL + "list index out of range", BUILD),
    "qwen4_exp_text": Refusal(_NO_SMALL + "list index out of range", BUILD),
    "recurrent_gemma": Refusal(_HYBRID, BUILD),
    "reformer": Refusal(_NO_SMALL + "ReformerModelWithLMHead needs is_decoder=True", BUILD),
    "rwkv": Refusal(_NO_SMALL + "tensor a (64) must match tensor b (4096)", BUILD),
    "sarvam_mla": Refusal(_MLA, BUILD),
    "sarvam_moe": Refusal(_MOE, TARGETS),
    "solar_open": Refusal(_MOE, TARGETS),
    "xlnet": Refusal(_NO_SMALL + "it has no sequence-length limit to set", BUILD),
    "xlstm": Refusal(_NO_SMALL + "tensor a (4096) must match tensor b (64)", BUILD),
    "xmod": Refusal(_NO_SMALL + "input language unknown (set_default_language)", BUILD),
    "youtu": Refusal(_MLA, BUILD),
    "zamba": Refusal(_HYBRID, BUILD),
    "zamba2": Refusal(_HYBRID, BUILD),
    "zaya": Refusal(_RECURRENT, TARGETS),

}


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal LM class."""
    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def _shrink(config: PretrainedConfig) -> None:
    layers = getattr(config, "num_hidden_layers", None)
    for key, value in SMALL_SIZES.items():
        if hasattr(config, key):
            try:
                setattr(config, key, value)
            except (AttributeError, TypeError, ValueError):
                continue  # a derived or per-layer attribute: the config keeps its own
    if isinstance(layers, int) and getattr(config, "num_hidden_layers", layers) != layers:
        for key, value in list(vars(config).items()):  # per-layer lists (layer_types, ...) follow the layer count
            if isinstance(value, list) and len(value) == layers:
                setattr(config, key, value[: config.num_hidden_layers])


def small_config(model_type: str) -> PretrainedConfig:
    """``model_type``'s default config with every size in :data:`SMALL_SIZES` it has (also in a nested text config)."""
    config = CONFIG_MAPPING[model_type]()
    _shrink(config)
    for sub in list(vars(config).values()):  # text / vision / audio towers of multimodal configs
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
    by_reason: dict[str, list[str]] = {}
    for model_type, refusal in sorted(REFUSED.items()):
        by_reason.setdefault(refusal.reason, []).append(model_type)
    lines = [f"Supported ({len(supported())} of {len(causal_lm_types())} causal-LM types in transformers "
             f"{transformers.__version__}): " + ", ".join(f"`{t}`" for t in supported()) + ".", "",
             f"Refused ({len(REFUSED)}), by reason:", ""]
    lines += [f"* {', '.join(f'`{t}`' for t in types)}: {reason}" for reason, types in sorted(by_reason.items())]
    return "\n".join(lines) + "\n"


__all__ = ["BUILD", "MATRIX_ARCHITECTURES", "NOT_TRIED", "REFUSED", "TARGETS", "Refusal", "causal_lm_types",
           "render_markdown", "small_config", "small_model", "supported"]

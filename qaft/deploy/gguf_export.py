"""GGUF export of a merged LLaMA-architecture qaft model (how a qaft model reaches llama.cpp).

A 4-bit layer whose group size is a multiple of 32 maps exactly onto GGUF's Q4_1: each block of 32
weights stores ``w = d * u + m`` with ``u`` in [0, 15] and fp16 ``d``, ``m``. qaft's
``W = s * (u - 8) + b`` gives ``d = s`` and ``m = b - 8 s``; every block of a group shares its group's
``d`` and ``m``. The codes carry over unchanged, so the only error is the fp16 rounding of ``d`` and ``m``.
Other tensors are written F16 (matrices) and F32 (norms). Other integer layers (2/3/8 bits, groups not
a multiple of 32) have no exact GGUF type: they are refused, or written dequantized as F16 with
``allow_float=True``.

llama.cpp's converter permutes the rows of ``q_proj``/``k_proj`` (rotary halves interleaved per head) and
readers such as transformers' GGUF loader undo it; the same row permutation is applied here to the codes,
scales and offsets, which is exact because groups run along the input dimension.

Tokenizer metadata (GPT-2 BPE vocabulary, merges, special ids, chat template) is copied from a reference
GGUF with the same vocabulary, by default the SmolLM2 file that qaft's built-in model comes from.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from qaft.methods.act_kv import has_act_kv
from qaft.models import smollm2_gguf_path
from qaft.quant.linear import QuantizedLinear

Q4_1_BLOCK = 32


def q4_1_exact(layer: QuantizedLinear) -> bool:
    """Whether ``layer`` maps onto Q4_1 without re-quantization."""
    return layer.bits == 4 and layer.group_size % Q4_1_BLOCK == 0


def q4_1_bytes(layer: QuantizedLinear) -> np.ndarray:
    """The layer as Q4_1 blocks: uint8 (out, in / 32 * 20), each block ``d, m`` (fp16) then 16 code bytes.

    Within a block, code ``j`` sits in the low nibble of byte ``j`` and code ``j + 16`` in its high nibble.
    """
    u = (layer.codes().to(torch.int16) + 8).to(torch.uint8)  # the stored unsigned codes
    out_f, in_f = u.shape
    blocks = u.reshape(out_f, in_f // Q4_1_BLOCK, 2, Q4_1_BLOCK // 2)
    qs = blocks[:, :, 0] | (blocks[:, :, 1] << 4)
    per_group = layer.group_size // Q4_1_BLOCK
    d = layer.scale.repeat_interleave(per_group, dim=1)
    m = (layer.offset - 8 * layer.scale).repeat_interleave(per_group, dim=1)
    d16 = d.to(torch.float16).view(torch.uint8).reshape(out_f, -1, 2)
    m16 = m.to(torch.float16).view(torch.uint8).reshape(out_f, -1, 2)
    return torch.cat([d16, m16, qs], -1).reshape(out_f, -1).numpy()


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q/k: per head, the two rotary halves interleaved."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _row_order(hf_name: str, rows: int, config: Any) -> np.ndarray | None:
    if ".q_proj." in hf_name:
        return rope_permutation(rows, config.num_attention_heads)
    if ".k_proj." in hf_name:
        return rope_permutation(rows, config.num_key_value_heads)
    return None


def _add_llama_metadata(writer: gguf.GGUFWriter, config: Any, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(head_dim)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_1)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def copy_tokenizer_metadata(writer: gguf.GGUFWriter, reference: str | Path, vocab_size: int) -> None:
    """Copy every ``tokenizer.*`` key of a reference GGUF whose vocabulary has ``vocab_size`` tokens."""
    reader = gguf.GGUFReader(str(reference))
    tokens = reader.fields["tokenizer.ggml.tokens"]
    if len(tokens.data) != vocab_size:
        raise ValueError(f"reference tokenizer {reference} has {len(tokens.data)} tokens, the model {vocab_size}")
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type)


def _tensor_entries(model: nn.Module):
    """Yield ``(hf_name, array, raw_dtype or None)`` for every tensor to write."""
    quantized = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, layer in quantized.items():
        if q4_1_exact(layer):
            yield name, q4_1_bytes(layer), gguf.GGMLQuantizationType.Q4_1
        else:  # allow_float (export_gguf refuses non-exact layers otherwise)
            yield name, layer.dequantize_weight().to(torch.float16).numpy(), None
        if layer.bias is not None:
            yield name[: -len("weight")] + "bias", layer.bias.detach().float().numpy(), None
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if f"{owner}.weight" in quantized or (tied and name == "lm_head.weight"):
            continue
        # Matrices F16 as in llama.cpp's f16 files; 1-D tensors (norms) stay F32 as llama.cpp requires.
        dtype = torch.float16 if t.dim() > 1 else torch.float32
        yield name, t.detach().to(dtype).numpy(), None


def export_gguf(model: nn.Module, path: str | Path, tokenizer_gguf: str | Path | None = None,
                allow_float: bool = False, name: str = "qaft") -> Path:
    """Write a merged LLaMA-architecture model as GGUF (integer layers as Q4_1, exactly); returns ``path``."""
    config = model.config
    if getattr(config, "model_type", None) != "llama":
        raise ValueError(f"GGUF export supports the llama architecture, got {config.model_type!r}")
    if has_act_kv(model):  # GGUF has no per-token activation / KV quantizer: the file would compute another model
        raise ValueError("GGUF export supports weight-only models; this one quantizes activations / the KV cache "
                         "(act_bits / kv_bits < 16)")
    bad = [n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and not q4_1_exact(m)]
    if bad and not allow_float:  # fail before the (slow) tokenizer copy
        raise ValueError(f"{bad[0]} (and {len(bad) - 1} more): no exact GGUF type for this layout "
                         "(Q4_1 needs 4 bits, group size a multiple of 32); pass allow_float=True")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    _add_llama_metadata(writer, config, name)
    copy_tokenizer_metadata(writer, tokenizer_gguf or smollm2_gguf_path(), config.vocab_size)
    with torch.no_grad():
        for hf_name, array, raw_dtype in _tensor_entries(model):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name}")
            order = _row_order(hf_name, array.shape[0], config)
            if order is not None:
                array = np.ascontiguousarray(array[order])
            writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path

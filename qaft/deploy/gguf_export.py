"""GGUF export of a merged LLaMA-family qaft model (llama, mistral, qwen2, qwen3): how a qaft model reaches llama.cpp.

GGUF's Q4_1 stores per block of 32 weights ``w = d * u + m`` with fp16 ``d``, ``m`` and 4-bit unsigned ``u``.
qaft's ``W = s * (u - 2^(n-1)) + b`` (``n``-bit unsigned codes ``u``) maps onto it with ``d = s`` and
``m = b - 2^(n-1) s`` whenever ``n <= 4`` (2- and 3-bit codes fit a nibble too) and the group size is a multiple
of 32 (every block of a group shares its ``d``, ``m``). The codes carry over unchanged, so the only error is the
fp16 rounding of ``d`` and ``m``. Other layouts (8 bits, groups not a multiple of 32) have no exact GGUF type:
the export refuses with one line naming the closest type and the relative weight error ``||W_gguf - W|| / ||W||``
of re-quantizing into it, measured on the model; it writes that type with ``approximate=True`` (the error is
logged and stored under ``qaft.requantization.relative_error``), or F16 with ``allow_float=True``. Other
tensors are F16 (matrices) and F32 (norms, biases).

Architectures follow llama.cpp's converter: Mistral is written as ``llama`` (its sliding window caps the context
length, within which windowed and full attention agree); llama/mistral ``q_proj``/``k_proj`` rows are permuted
(rotary halves interleaved per head) -- exact for the codes, scales and offsets, as groups run along the input
dimension -- and readers such as transformers' GGUF loader undo it; qwen2 keeps HF's rotary layout and its
q/k/v biases; qwen3 is qwen2's layout without biases, with per-head q/k RMSNorms (``attn_q_norm`` / ``attn_k_norm``).
Other architectures are refused in one line naming these (phi3's fused ``qkv_proj`` / ``gate_up_proj`` and gemma2's
shifted norms, soft-capping and embedding scale need their own writer, not yet checked against a reader). The
tokenizer is the model's own (:mod:`qaft.deploy.gguf_vocab`).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from qaft.deploy.gguf_vocab import gguf_vocab
from qaft.files import atomic_file
from qaft.methods.act_kv import has_act_kv
from qaft.quant.linear import QuantizedLinear

BLOCK = 32
QT = gguf.GGMLQuantizationType
ERROR_KEY = "qaft.requantization.relative_error"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GGUFArch:
    """How llama.cpp's converter writes one HF ``model_type``."""

    arch: gguf.MODEL_ARCH
    rope_permute: bool  # q/k rows interleaved per head (llama.cpp's LLaMA rotary layout)
    biases: tuple[str, ...]  # linear layers that may carry a bias (the reader knows where to put it)
    key_length_read: bool = False  # readers take head_dim from attention.key_length, not hidden / heads


GGUF_ARCHES = {
    "llama": GGUFArch(gguf.MODEL_ARCH.LLAMA, True, ()),
    "mistral": GGUFArch(gguf.MODEL_ARCH.LLAMA, True, ()),  # llama.cpp has no separate Mistral (v0.x) arch
    "qwen2": GGUFArch(gguf.MODEL_ARCH.QWEN2, False, ("q_proj", "k_proj", "v_proj")),
    # qwen2's layout without biases, plus per-head q/k RMSNorms; llama.cpp reads head_dim from key_length
    "qwen3": GGUFArch(gguf.MODEL_ARCH.QWEN3, False, (), key_length_read=True),
}


def exact_gguf_type(layer: QuantizedLinear) -> gguf.GGMLQuantizationType | None:
    """The GGUF block type holding ``layer`` without re-quantization (``None`` if there is none)."""
    if layer.group_size % BLOCK:
        return None
    return QT.Q4_1 if layer.bits <= 4 else None


def closest_gguf_type(layer: QuantizedLinear) -> gguf.GGMLQuantizationType:
    """The exact type if any, else the block type of the nearest width gguf-py can write (F16 for rows that
    are not whole blocks)."""
    if layer.in_features % BLOCK:
        return QT.F16
    return exact_gguf_type(layer) or (QT.Q4_1 if layer.bits <= 4 else QT.Q8_0)


def affine_blocks(layer: QuantizedLinear) -> np.ndarray:
    """``layer`` as Q4_1 blocks: uint8 (out, in / 32 * 20), each block ``d, m`` (fp16) then 16 code bytes.

    Within a block, code ``j`` sits in the low nibble of byte ``j`` and code ``j + 16`` in its high nibble.
    """
    if exact_gguf_type(layer) is None:
        raise ValueError(f"{layer.bits}-bit groups of {layer.group_size}: no exact GGUF block type")
    half = 2 ** (layer.bits - 1)
    u = (layer.codes().to(torch.int16) + half).to(torch.uint8).numpy()
    out_f, in_f = u.shape
    blocks = u.reshape(out_f, in_f // BLOCK, BLOCK)
    qs = blocks[..., :16] | (blocks[..., 16:] << 4)
    per_group = layer.group_size // BLOCK
    d = layer.scale.detach().repeat_interleave(per_group, dim=1)
    m = (layer.offset.detach() - half * layer.scale.detach()).repeat_interleave(per_group, dim=1)
    d16 = d.to(torch.float16).numpy()[..., None].view(np.uint8)
    m16 = m.to(torch.float16).numpy()[..., None].view(np.uint8)
    return np.concatenate([d16, m16, qs], -1).reshape(out_f, -1)


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q/k: per head, the two rotary halves interleaved."""
    return np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)


def _weight_error(layers: list[QuantizedLinear], qtype: gguf.GGMLQuantizationType) -> float:
    """Relative Frobenius error of writing ``layers`` as ``qtype`` (from their dequantized weights)."""
    err = ref = 0.0
    for layer in layers:
        w = layer.dequantize_weight().detach().float().numpy()
        back = gguf.quants.dequantize(gguf.quants.quantize(w, qtype), qtype).reshape(w.shape)
        err, ref = err + float(((back - w) ** 2).sum()), ref + float((w ** 2).sum())
    return (err / max(ref, 1e-30)) ** 0.5


def approximation_report(model: nn.Module) -> tuple[str, float] | None:
    """For a model with layers of no exact GGUF type: one line saying which, the closest type, and the measured
    relative weight error of writing them as that type (and as F16); ``None`` when every layer is exact."""
    bad = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and exact_gguf_type(m) is None}
    if not bad:
        return None
    by_type: dict[gguf.GGMLQuantizationType, list[QuantizedLinear]] = {}
    for layer in bad.values():
        by_type.setdefault(closest_gguf_type(layer), []).append(layer)
    errors = {t.name: _weight_error(layers, t) for t, layers in by_type.items()}
    first = next(iter(bad.values()))
    closest = ", ".join(f"{t} (relative weight error {e:.2e})" for t, e in errors.items())
    f16 = _weight_error(list(bad.values()), QT.F16)
    line = (f"{next(iter(bad))} (and {len(bad) - 1} more): {first.bits}-bit groups of {first.group_size} have no exact "
            f"GGUF type (Q4_1: <= 4 bits, groups a multiple of 32); closest: {closest}, F16 "
            f"{f16:.1e}, measured on this model")
    return line, max(errors.values())


def _attention_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if window is None or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _head_dim(config: Any) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_exportable(model: nn.Module) -> GGUFArch:
    """The model's :class:`GGUFArch`, or ``ValueError`` with one line on what GGUF (or its readers) cannot hold."""
    config = model.config
    spec = GGUF_ARCHES.get(getattr(config, "model_type", None))
    if spec is None:
        raise ValueError(f"GGUF export supports the {sorted(GGUF_ARCHES)} architectures, got {config.model_type!r}")
    if has_act_kv(model):  # GGUF has no per-token activation / KV quantizer: the file would compute another model
        raise ValueError("GGUF export supports weight-only models; this one quantizes activations / the KV cache "
                         "(act_bits / kv_bits < 16)")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"GGUF export writes plain RoPE; this model scales it ({rope.get('rope_type')!r})")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, QuantizedLinear)) and module.bias is not None \
                and name.rsplit(".", 1)[-1] not in spec.biases:
            raise ValueError(f"{name} has a bias, which the {config.model_type} GGUF layout has no tensor for")
    if not (spec.rope_permute or spec.key_length_read) and _head_dim(config) * config.num_attention_heads \
            != config.hidden_size:
        raise ValueError(f"{config.model_type}: head_dim {_head_dim(config)} != hidden/heads, which GGUF readers "
                         "assume for this architecture")
    return spec


def _add_metadata(writer: gguf.GGUFWriter, config: Any, name: str, vocab_size: int) -> None:
    window = _attention_window(config)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(min(config.max_position_embeddings, window or config.max_position_embeddings))
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(_head_dim(config))
    writer.add_value_length(_head_dim(config))
    writer.add_rope_dimension_count(_head_dim(config))
    writer.add_rope_freq_base(float(_rope_theta(config)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(vocab_size)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _rope_theta(config: Any) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return params.get("rope_theta", getattr(config, "rope_theta", 10000.0))


def _quantized_entry(layer: QuantizedLinear, approximate: bool):
    """``(array, raw_dtype or None)`` of one integer layer: exact blocks, re-quantized blocks, or F16."""
    if exact_gguf_type(layer) is not None:
        return affine_blocks(layer), exact_gguf_type(layer)
    w = layer.dequantize_weight().detach().float().numpy()
    if approximate:
        return gguf.quants.quantize(w, closest_gguf_type(layer)), closest_gguf_type(layer)
    return w.astype(np.float16), None  # allow_float


def _tensor_entries(model: nn.Module, approximate: bool):
    """Yield ``(hf_name, array, raw_dtype or None)`` for every tensor to write."""
    quantized = {f"{n}.weight": m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, layer in quantized.items():
        yield (name, *_quantized_entry(layer, approximate))
        if layer.bias is not None:
            yield name[: -len("weight")] + "bias", layer.bias.detach().float().numpy(), None
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        owner = name.rsplit(".", 1)[0]
        if f"{owner}.weight" in quantized or (tied and name == "lm_head.weight"):
            continue
        # Matrices F16 as in llama.cpp's f16 files; 1-D tensors (norms, biases) stay F32 as llama.cpp requires.
        dtype = torch.float16 if t.dim() > 1 else torch.float32
        yield name, t.detach().to(dtype).numpy(), None


def _file_type(model: nn.Module, approximate: bool) -> gguf.LlamaFileType:
    """The most common block type among integer layers (``general.file_type`` is informative only)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            t = exact_gguf_type(m) or (closest_gguf_type(m) if approximate else QT.F16)
            counts[t.name] = counts.get(t.name, 0) + 1
    return gguf.LlamaFileType[f"MOSTLY_{max(counts, key=counts.get)}"] if counts else gguf.LlamaFileType.MOSTLY_F16


def _add_tensors(writer: gguf.GGUFWriter, model: nn.Module, spec: GGUFArch, approximate: bool) -> None:
    config = model.config
    names = gguf.get_tensor_name_map(spec.arch, config.num_hidden_layers)
    with torch.no_grad():
        for hf_name, array, raw_dtype in _tensor_entries(model, approximate):
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise ValueError(f"no GGUF name for tensor {hf_name}")
            if spec.rope_permute and (".q_proj." in hf_name or ".k_proj." in hf_name):
                heads = config.num_attention_heads if ".q_proj." in hf_name else config.num_key_value_heads
                array = np.ascontiguousarray(array[rope_permutation(array.shape[0], heads)])
            writer.add_tensor(gguf_name, array, raw_dtype=raw_dtype)


def export_gguf(model: nn.Module, path: str | Path, tokenizer: Any = None, approximate: bool = False,
                allow_float: bool = False, name: str = "qaft") -> Path:
    """Write a merged llama / mistral / qwen2 / qwen3 model and its HF fast ``tokenizer`` as GGUF; returns ``path``.

    Integer layers become exact Q4_1 blocks; a layer with no exact type is refused with the measured
    error of the closest type, unless ``approximate`` (write the closest type) or ``allow_float`` (F16).
    The file is written whole or not at all (it replaces a file already at ``path``).
    """
    spec, config = check_exportable(model), model.config
    if tokenizer is None:
        raise ValueError("GGUF export needs the model's tokenizer (a GGUF file carries its vocabulary)")
    vocab_size = model.get_input_embeddings().weight.shape[0]
    vocab = gguf_vocab(tokenizer, vocab_size)
    report = approximation_report(model)
    if report is not None and not (approximate or allow_float):
        raise ValueError(f"{report[0]}; pass approximate=True to write the closest type, allow_float=True for F16")
    path = Path(path)
    with atomic_file(path) as tmp:  # a killed export leaves the previous file or none, never an unreadable one
        writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[spec.arch])
        _add_metadata(writer, config, name, vocab_size)
        writer.add_file_type(_file_type(model, approximate))
        if report is not None and approximate:
            logger.warning("GGUF export re-quantizes: %s", report[0])
            writer.add_float32(ERROR_KEY, report[1])
        vocab.add_to(writer)
        _add_tensors(writer, model, spec, approximate)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path

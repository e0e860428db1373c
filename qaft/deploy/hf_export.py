"""``format=hf``: a merged integer model as a torchao checkpoint that transformers loads without qaft.

qaft's integer layer computes, per group of ``group_size`` inputs, ``W = s q + b`` with signed codes
``q`` in ``[-2^(n-1), 2^(n-1) - 1]`` (:mod:`qaft.quant.linear`). torchao's ``IntxUnpackedToInt8Tensor`` (any
of 1..8 bits, one int8 per code, per-group ``scale`` and ``zero_point``) computes ``W = (q - z) s``. So

* the integer zero point option (``b = s (2^(n-1) - z_int)``) is ``z = z_int - 2^(n-1)``, an int8: the layout
  is qaft's exactly, and ``(q - z) s`` is one rounding of the exact product;
* a float offset ``b`` (the default, QA-LoRA's fractional offsets at any bit width) is the float zero point
  ``z = -b / s``, kept in float32: codes and scales are qaft's exactly, and ``(q - z) s`` differs from
  ``s q + b`` by float32 rounding only (a few ulp of the weight).

The codes are carried exactly at 2, 3, 4 and 8 bits, so no case is approximated. The file is a plain
safetensors file (torchao's ``flatten_tensor_state_dict``: tensors plus JSON metadata that names only
torchao's allow-listed tensor classes), with ``config.json`` holding transformers' ``TorchAoConfig``:
``AutoModelForCausalLM.from_pretrained(folder)`` rebuilds the layers with ``torchao`` installed and no pickle.
One byte per code on disk: this is the exact hand-over format, not the compact one (GGUF / ``format=qaft``).

Models that quantize activations or the KV cache (W-A-KV) are refused: no format transformers loads applies
qaft's per-token activation quantizers; so are integer layers in the place of GPT-2's ``Conv1D`` (torchao's loader
quantizes ``nn.Linear`` modules only), and where the architecture's own ``nn.Linear`` subclass (Falcon's
``FalconLinear``: ``input @ weight.T``) does not run on torchao's tensors.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import PreTrainedModel

from qaft.deploy.ct_export import integer_zero
from qaft.deploy.packed import WEIGHTS_FILE, check_weight_only_integer, unique_tensors
from qaft.files import atomic_folder
from qaft.quant.linear import QuantizedLinear


def zero_point(layer: QuantizedLinear) -> tuple[torch.Tensor, bool]:
    """torchao's ``zero_point`` for ``layer`` and whether it is the integer one (exact layout)."""
    z_int = integer_zero(layer)  # offset_of_zero's grid (to a float rounding of b: DL-QAT's (m s, m b))
    if z_int is not None:
        return z_int, True
    return -layer.offset / layer.scale, False


def torchao_weight(layer: QuantizedLinear, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, bool]:
    """``layer``'s weight as an ``IntxUnpackedToInt8Tensor`` (codes and float32 scales as they are) that
    dequantizes to ``dtype``, and whether its zero point is the integer one."""
    from torchao.quantization import IntxUnpackedToInt8Tensor

    zero, is_int = zero_point(layer)
    weight = IntxUnpackedToInt8Tensor(
        qdata=layer.codes(), scale=layer.scale.clone(), zero_point=zero.contiguous(),
        target_dtype=getattr(torch, f"int{layer.bits}"), block_size=(1, layer.group_size),
        dtype=dtype, activation_quantization=None)
    return weight, is_int


def _replace_layers(model: nn.Module, dtype: torch.dtype) -> dict[str, bool]:
    """Swap every ``QuantizedLinear`` for an ``nn.Linear`` holding its torchao weight; name -> integer zero."""
    zeros = {}
    for name, layer in [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]:
        weight, zeros[name] = torchao_weight(layer, dtype)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().clone(), requires_grad=False)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, linear)
    for tensor in [*model.parameters(), *model.buffers()]:  # embeddings, norms, float linears, biases
        if type(tensor) in (torch.Tensor, nn.Parameter) and tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    return zeros


def quantization_config(model: nn.Module, quantized: list[str]) -> dict[str, Any]:
    """transformers' ``TorchAoConfig`` (as a dict) for the layers ``quantized``; other linears stay float."""
    from torchao.quantization import IntxWeightOnlyConfig, MappingType, PerGroup
    from transformers import TorchAoConfig

    first = model.get_submodule(quantized[0]).weight
    config = TorchAoConfig(IntxWeightOnlyConfig(
        weight_dtype=first.target_dtype, granularity=PerGroup(first.block_size[1]),
        mapping_type=MappingType.ASYMMETRIC, intx_packing_format="unpacked_to_int8"))
    # each layer's bits and group size travel with its tensor (safetensors metadata); loading reads those
    config.modules_to_not_convert = sorted(n for n, m in model.named_modules()
                                           if isinstance(m, nn.Linear) and n not in quantized)
    return config.to_dict()


def check_exportable(model: nn.Module) -> None:
    """``ValueError`` (one line) for a model no transformers-loadable format expresses exactly, or no torchao."""
    check_weight_only_integer(model, "hf", "torchao",
                              "torchao (pip install 'qaft[hf]'); the exported folder needs it to load too",
                              "; no format transformers loads applies those quantizers",
                              "merge it with qaft.merge_model first")
    foreign = _foreign_positions(model)
    if foreign:
        name, kind = foreign[0]
        raise ValueError(f"format=hf: {name} (and {len(foreign) - 1} more) is a {kind} in {model.config.model_type!r}, "
                         "not an nn.Linear: torchao's transformers loader quantizes nn.Linear modules only (and a "
                         "subclass with its own forward does not run on torchao weights); use format=qaft "
                         "(qaft.deploy.load_quantized)")


def _foreign_positions(model: nn.Module) -> list[tuple[str, str]]:
    """``(name, class)`` of integer layers that sit where the architecture builds something other than an exact
    ``nn.Linear`` (GPT-2's ``Conv1D``, Falcon's ``FalconLinear``), from its class built on the meta device."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        fresh = dict(AutoModelForCausalLM.from_config(model.config).named_modules())
    return [(n, type(fresh[n]).__name__) for n, m in model.named_modules()
            if isinstance(m, QuantizedLinear) and n in fresh and type(fresh[n]) is not nn.Linear]


def export_hf(model: PreTrainedModel, path: str | Path, tokenizer: Any = None,
              dtype: torch.dtype = torch.float32) -> tuple[Path, dict[str, bool]]:
    """Write ``model`` (integer layers as ``QuantizedLinear``; it is modified in place) as a torchao folder,
    whole or not at all (it replaces a folder already at ``path``).

    ``dtype`` is the compute dtype the folder loads in (transformers applies its config's ``dtype``; torchao
    weights keep the one they were written with): float tensors are stored in it, and integer layers
    dequantize to it from their float32 scales. Returns the folder and, per integer layer, whether its zero
    point is the integer one.
    """
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    check_exportable(model)
    path = Path(path)
    zeros = _replace_layers(model, dtype)
    tensors, metadata = flatten_tensor_state_dict(unique_tensors(model))
    with atomic_folder(path) as tmp:  # a killed export leaves the previous folder or none, never half of one
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE),
                  metadata={**metadata, "format": "pt"})
        model.config.quantization_config = quantization_config(model, list(zeros))
        model.config.dtype = dtype
        model.config.save_pretrained(str(tmp))
        del model.config.quantization_config
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        (tmp / "qaft_export.json").write_text(json.dumps(
            {"format": "torchao IntxUnpackedToInt8Tensor", "integer_zero_point": zeros}, indent=1))
    return path, zeros

"""``format=compressed-tensors``: a merged integer model as the ``pack-quantized`` checkpoint vLLM and transformers load.

compressed-tensors (the vLLM project's checkpoint format, what ``llm-compressor`` writes) stores an integer layer
as ``weight_packed`` (int32 words, 32 / n codes each), ``weight_scale`` per group (or per output channel) and, for
an asymmetric scheme, ``weight_zero_point`` (integers, packed the same way); it dequantizes
``W = (q - z) s`` with signed codes ``q`` in ``[-2^(n-1), 2^(n-1) - 1]``. qaft's layer is ``W = s q + b``
(:mod:`qaft.quant.linear`), so

* a symmetric layer (``b = 0``) is ``z`` absent: codes and scales as they are;
* an integer-zero layer (``zero_point="int"``: ``b = s (2^(n-1) - z_int)``, :func:`qaft.quant.affine.offset_of_zero`)
  is ``z = z_int - 2^(n-1)``, an integer: the layout exactly, and ``(q - z) s`` is one rounding of the product;
* a float offset (the default zero point of L4Q / DL-QAT, the +PTQ of float merges, QA-LoRA's merge by design) has
  no integer ``z``: such a model is refused with the measured error of its nearest integer-zero grid
  (:func:`nearest_integer_grid`), and written on that grid with ``approximate=True``, the error in
  ``qaft_export.json``.

The format packs 1..8 bits, so 2, 3, 4 and 8-bit layers are all carried (vLLM's mixed-precision kernels take 4 and
8 bits). The checkpoint is built by the library itself, the way ``llm-compressor`` saves: the quantization config is
applied to plain ``nn.Linear`` layers holding the dequantized weights, their ``weight_scale`` / ``weight_zero_point``
are set to qaft's, and :class:`~compressed_tensors.compressors.ModelCompressor` compresses the model (re-rounding
``W / s + z``, which gives back qaft's codes; checked code for code) and writes its config into ``config.json``.
Compression runs in float32; ``dtype`` then casts every float tensor, scales included, as vLLM's kernels take them.

Models that quantize activations or the KV cache (W-A-KV) are refused: ``format=qaft`` keeps their quantizers.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qaft.deploy.packed import check_weight_only_integer
from qaft.files import atomic_folder
from qaft.quant.affine import offset_of_zero
from qaft.quant.linear import QuantizedLinear, rtn_quantize

FORMAT = "pack-quantized"
METADATA_FILE = "qaft_export.json"
PROBE_SHAPE = (2, 64)  # seeded random tokens on which an approximation's logit error is measured
PROBE_SEED = 0


@dataclass(frozen=True)
class Grid:
    """One layer's compressed-tensors scheme: bits, group size (``None``: per output channel), symmetric."""

    bits: int
    group_size: int | None
    symmetric: bool

    def args(self) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        strategy = "channel" if self.group_size is None else "group"
        return QuantizationArgs(num_bits=self.bits, type="int", symmetric=self.symmetric, strategy=strategy,
                                group_size=self.group_size)


def grid(layer: QuantizedLinear, symmetric: bool) -> Grid:
    return Grid(layer.bits, None if layer.group_size == layer.in_features else layer.group_size, symmetric)


def integer_zero(layer: QuantizedLinear) -> torch.Tensor | None:
    """compressed-tensors' zero point of ``layer`` (int8, ``z_int - 2^(n-1)``), or ``None`` where its offsets are not
    the integer-zero grid's. ``b / s`` may miss the integer by float rounding (DL-QAT deploys ``(m s, m b)``, one
    rounding off ``(m s)(2^(n-1) - z)``): a few ulp of the ratio are accepted, and the layer computes the same to
    that rounding."""
    half = 2 ** (layer.bits - 1)
    ratio = layer.offset.double() / layer.scale.double()
    k = ratio.round()
    on_grid = (ratio - k).abs() <= 4 * torch.finfo(torch.float32).eps * k.abs().clamp(min=1)
    z = half - k
    if not bool((on_grid & (z >= 0) & (z < 2 * half)).all()):
        return None
    return (z - half).to(torch.int8)


def is_exact(layer: QuantizedLinear) -> bool:
    """Whether ``layer``'s offsets are the integer-zero grid's (or all zero): compressed-tensors holds it as it is."""
    return not bool(layer.offset.any()) or integer_zero(layer) is not None


def check_exportable(model: nn.Module) -> None:
    """``ValueError`` (one line) for a model compressed-tensors cannot express, or no compressed-tensors installed."""
    check_weight_only_integer(model, "compressed-tensors", "compressed_tensors",
                              "compressed-tensors (pip install 'qaft[ct]')", ", which this export does not carry",
                              "a float merge is exported as its run deployed it: qaft-export RUN_DIR, or merge it "
                              "with qaft.merge_model first")


def nearest_integer_grid(layer: QuantizedLinear) -> QuantizedLinear:
    """``layer`` on an integer-zero grid: of its own codes and scales with the zero rounded to an integer, and its
    weights re-quantized round-to-nearest onto a min-max integer-zero grid, the one closer to its weights."""
    half = 2 ** (layer.bits - 1)
    rounded = QuantizedLinear(layer.codes(), layer.scale,
                              offset_of_zero(layer.scale, half - layer.offset / layer.scale, layer.bits),
                              layer.bits, layer.bias)
    w = layer.dequantize_weight()
    refit = QuantizedLinear(*rtn_quantize(w, layer.bits, layer.group_size, "minmax", False, "int"), layer.bits,
                            layer.bias)
    return min((rounded, refit), key=lambda c: float((c.dequantize_weight() - w).norm()))


def probe_ids(vocab_size: int) -> torch.Tensor:
    """The seeded random tokens an approximation's logit error is measured on (reproducible from the metadata)."""
    return torch.randint(0, vocab_size, PROBE_SHAPE, generator=torch.Generator().manual_seed(PROBE_SEED))


def _swap(model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """Put ``layers`` (name -> module) into ``model``; returns the modules they replaced."""
    old = {}
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        old[name] = getattr(owner, child)
        setattr(owner, child, layer)
    return old


@torch.no_grad()
def logit_error(model: nn.Module, replaced: dict[str, nn.Module]) -> dict[str, float]:
    """How much replacing ``replaced`` changes the model's logits on :func:`probe_ids`: relative RMS and max abs."""
    ids = probe_ids(model.get_input_embeddings().weight.shape[0]).to(model.device)
    ref = model(ids).logits.float()
    old = _swap(model, replaced)
    try:
        out = model(ids).logits.float()
    finally:
        _swap(model, old)
    return {"relative_rms": float((out - ref).norm() / ref.norm()), "max_abs": float((out - ref).abs().max()),
            "tokens": ids.numel(), "seed": PROBE_SEED}


def approximation(model: nn.Module) -> tuple[dict[str, QuantizedLinear], dict[str, Any] | None]:
    """The nearest integer-zero grid of every layer compressed-tensors cannot hold exactly, and the measured logit
    error of writing them so (``None``: every layer is exact)."""
    inexact = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and not is_exact(m)}
    if not inexact:
        return {}, None
    nearest = {name: nearest_integer_grid(layer) for name, layer in inexact.items()}
    return nearest, {"layers": len(inexact), "logit_error": logit_error(model, nearest)}


def refusal(model: nn.Module, report: dict[str, Any]) -> str:
    """The one line that refuses a float-offset model, with the measured error of its nearest integer-zero grid."""
    total = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    err = report["logit_error"]
    return (f"format=compressed-tensors: {report['layers']} of {total} integer layers have float offsets (no integer "
            f"zero point), which compressed-tensors cannot carry; their nearest integer-zero grid changes the logits "
            f"by {err['relative_rms']:.2e} relative RMS ({err['max_abs']:.2e} max abs, {err['tokens']} seeded random "
            "tokens): pass approximate=true to write it with that error in qaft_export.json (an exact export needs "
            "an integer method run with method.zero_point=int)")


def _to_linears(model: nn.Module) -> dict[str, tuple[QuantizedLinear, Grid]]:
    """Swap every ``QuantizedLinear`` for an ``nn.Linear`` holding its dequantized float32 weight."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    symmetric = not any(bool(m.offset.any()) for m in layers.values())
    linears = {}
    for name, layer in layers.items():
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
        linear.weight = nn.Parameter(layer.dequantize_weight().float(), requires_grad=False)
        if layer.bias is not None:
            linear.bias = nn.Parameter(layer.bias.detach().float().clone(), requires_grad=False)
        linears[name] = linear
    _swap(model, linears)
    return {name: (layer, grid(layer, symmetric)) for name, layer in layers.items()}


def quantization_config(model: nn.Module, layers: dict[str, tuple[QuantizedLinear, Grid]]) -> Any:
    """compressed-tensors' ``QuantizationConfig``: one config group per grid, float linears (``lm_head``) ignored."""
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    grids = sorted({g for _, g in layers.values()}, key=repr)
    groups = {}
    for i, g in enumerate(grids):
        # one grid (every qaft run): llm-compressor's target, every Linear but the ignored ones
        targets = ["Linear"] if len(grids) == 1 else sorted(n for n, (_, lg) in layers.items() if lg == g)
        groups[f"group_{i}"] = QuantizationScheme(targets=targets, weights=g.args(), format=FORMAT)
    ignore = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in layers)
    return QuantizationConfig(config_groups=groups, ignore=ignore, format=FORMAT)


def _compress(model: nn.Module, layers: dict[str, tuple[QuantizedLinear, Grid]]) -> Any:
    """Apply the config, set qaft's scales and zero points, compress with the library; checks the codes."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
    from compressed_tensors.quantization import apply_quantization_config

    apply_quantization_config(model, quantization_config(model, layers), show_progress=False)
    for name, (layer, g) in layers.items():
        module = model.get_submodule(name)
        module.weight_scale.data = layer.scale.reshape(module.weight_scale.shape).clone()
        if not g.symmetric:
            zero = integer_zero(layer)
            module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(torch.int8)
    compressor = ModelCompressor.from_pretrained_model(model, FORMAT)
    compressor.compress_model(model)
    compressor.remove_decompression_hook(model)
    for name, (layer, _) in layers.items():
        module = model.get_submodule(name)
        if not torch.equal(unpack_from_int32(module.weight_packed, layer.bits, module.weight_shape), layer.codes()):
            raise RuntimeError(f"{name}: compressed-tensors packed other codes than qaft's")  # a library change
    return compressor


def _write(model: nn.Module, compressor: Any, tmp: Path, tokenizer: Any, metadata: dict[str, Any]) -> None:
    model.save_pretrained(str(tmp))
    compressor.update_config(str(tmp))
    if not metadata["symmetric"]:
        # transformers' compressed loading (compressed-tensors 0.18-0.20) builds the asymmetric zero point in its
        # unpacked shape and refuses the packed one ("size mismatch", llm-compressor issue 1618): decompressing
        # while loading reads it. A transformers loading option only; vLLM reads the checkpoint as it is.
        config = json.loads((tmp / "config.json").read_text())
        config["quantization_config"]["dequantize"] = True
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1))


def export_compressed_tensors(model: nn.Module, path: str | Path, tokenizer: Any = None,
                              dtype: torch.dtype = torch.float32, approximate: bool = False) -> tuple[Path, dict]:
    """Write a merged integer model (``QuantizedLinear`` layers; left unchanged) as a compressed-tensors
    ``pack-quantized`` folder, whole or not at all; returns the folder and its metadata (what
    ``qaft_export.json`` holds). A layer with float offsets is a one-line ``ValueError`` with the measured error of
    its nearest integer-zero grid, unless ``approximate`` (then written on that grid, the error in the metadata)."""
    check_exportable(model)
    nearest, report = approximation(model)
    if report is not None and not approximate:
        raise ValueError(refusal(model, report))
    model = copy.deepcopy(model)
    _swap(model, nearest)
    layers = _to_linears(model)
    compressor = _compress(model, layers)
    for tensor in [*model.parameters(), *model.buffers()]:  # scales too: vLLM's kernels take them in this dtype
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(dtype)
    model.config.dtype = dtype
    bits = sorted({g.bits for _, g in layers.values()})
    metadata = {"format": f"compressed-tensors {FORMAT}", "bits": bits, "layers": len(layers),
                "symmetric": all(g.symmetric for _, g in layers.values()), "exact": report is None,
                "approximation": report}
    path = Path(path)
    with atomic_folder(path) as tmp:  # a killed export leaves the previous folder or none, never half of one
        _write(model, compressor, tmp, tokenizer, metadata)
    return path, metadata

"""Inference layers for merged integer models, with dispatch to PyTorch's packed-weight kernels.

A :class:`~qaft.quant.linear.QuantizedLinear` stores ``W = s * (u - 2^(n-1)) + b`` per group, with
unsigned codes ``u`` packed ``n`` bits each. That is exactly the layout of PyTorch's int4 "tinygemm"
kernels (``W = (u - 8) * scale + zero``), so the 4-bit path needs no arithmetic change at all; 2- and 3-bit
codes shift into the same range (``u4 = q + 8``, scale and offset unchanged), which is also exact.

Paths, each built once from a ``QuantizedLinear`` (weights converted at construction, not per call):

* :class:`Int4Linear`: ``_weight_int4pack_mm_for_cpu`` (CPU) / ``_weight_int4pack_mm`` (CUDA).
  Constraints: group size in {32, 64, 128, 256}; CUDA also needs bf16 activations, ``in % 32 == 0``
  and ``out % 8 == 0``. On CPU, inputs of :data:`PREFILL_ROWS` tokens or more (prefill, perplexity windows)
  unpack the weight from the kernel's layout and run the dense GEMM, which is faster there than the kernel;
  nothing extra is kept in memory. The two kernels take different weight layouts (:func:`pack_int4`): the
  layer packs for the device it is built on, and repacks when moved to the other (``.to("cuda")``, ``.cpu()``).
* :class:`Int8Linear`: ``_weight_int8pack_mm`` takes one scale per output channel and no offset, so it
  serves per-channel 8-bit layers; an offset ``b`` is added back exactly as ``rowsum(x) * b``.
* :class:`Int8x8Linear` (W8A8): where a per-channel 8-bit layer also quantizes its input per token at 8 bits
  (``act_bits=8``), ``torch._int_mm`` multiplies the int8 activation codes by the int8 weight codes with exact
  int32 accumulation: ``y = s_x s_w (c_x · q) + s_x rowsum(c_x) b``. The layer quantizes its input itself (the
  same :func:`~qaft.quant.activation.quantize_per_token`), so the pre-hook is not carried over to it. Measured
  side by side against the same model fake-quantized on a dense bf16 GEMM, on 2 quiet cores
  (``experiments/bench/inference.py --variants bf16 int4 w8a8 w8a8-dequant --harnesses hf compiled+fuse
  --rounds 3 --no-llama-cpp --new-tokens 32 --prefill 512``, results/bench_inference_w8a8.json): decode 22.6 vs
  16.0 tok/s (HF generate, 1.41x) and 42.0 vs 29.0 (compiled, fused, 1.45x), 512-token prefill 856 vs 729 tok/s
  (1.17x; 1.05x dense bf16 without any quantization). So ``backend="auto"`` picks it on CPU for half-precision
  activations (:func:`_int_mm_is_fast`); with fp32 activations the dense fp32 path stays (int8 x int8 with fp32
  activations lost to it in 5 of 6 single-product timings, ``--gemv``), and CUDA, where ``_int_mm`` runs on int8 tensor cores, was not measured
  here and stays off until it is; ``backend="kernel"`` forces it.
* :class:`DequantLinear`: the weight dequantized once into the compute dtype (dense GEMM; no memory
  saving, but always correct and the fastest choice where the integer kernels are not vectorized).

``backend="auto"`` uses a kernel only where it is both applicable and measured faster than the dense GEMM.
On CPU that means half-precision activations only (bf16 measured; fp16 taken to behave alike). With fp32
activations both CPU kernels lose to dense fp32 on every machine measured. Single-token product, 576x576,
2-core AVX512 EPYC, torch 2.13 (``experiments/bench/inference.py --gemv``, the earlier run in results/bench_inference.md):
dense fp32 20 us, int4 kernel with fp32 activations 270 us, int8 kernel with fp32 activations 120 us;
with bf16 activations the same kernels take 15 us (int4) and 22 us (int8) against 40 us for dense bf16.
On an earlier AVX2 machine the fp32 int4 path made the whole model 2.4x slower than fp32 (so neither
AVX2 nor AVX512 is an exception).
``backend="kernel"`` forces the kernels wherever they apply (tests, benchmarks); ``backend="dequant"``
never uses them. For speed on CPU, prepare with ``dtype=torch.bfloat16``.

Why aten's ops and not torchao's (the maintained library this field would reach for): torchao 0.18 has no CPU
kernel for int4 weights with float activations. Its CPU-tuned int4 tensor (``IntxOpaqueTensor``, from
``Int8DynamicActivationIntxWeightConfig``) also quantizes the activations to 8 bits on the fly, which is another
model than the one trained, and needs torchao's C++ kernel library (not loadable from the x86 wheel here); its
weight-only tensor, ``IntxUnpackedToInt8Tensor`` (what ``qaft-export format=hf`` writes, so that transformers
loads the codes exactly), dequantizes the weight at every call. Measured as the ``int4-hf`` variant of
``experiments/bench/inference.py`` (transformers + torchao on the exported folder, results/bench_inference.md):
it decodes far slower than these layers, and prefills no faster. On CUDA, aten's ``_weight_int4pack_mm`` is
the tinygemm kernel torchao's own int4 CUDA layout uses.

``prepare_for_inference(..., fuse=True)`` first fuses q/k/v and gate/up into one layer each
(:mod:`qaft.deploy.fuse`): one int4 call instead of three or two, which measurably cuts decode time.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qaft.deploy.gemv import one_row_output
from qaft.methods.act_kv import INPUT
from qaft.methods.layer import replace_module
from qaft.quant.activation import PerTokenQuantizer, quantize_per_token
from qaft.quant.linear import QuantizedLinear

Backend = Literal["auto", "kernel", "dequant"]
INT4_GROUP_SIZES = (32, 64, 128, 256)
# From this many rows (tokens) on, the CPU int4 layer unpacks its weight and runs the dense GEMM instead of the
# int4 kernel. bf16, 2 cores, ms, kernel vs unpack + dense (experiments/bench/int4_unpack.py,
# results/bench_int4_unpack.md), 1536 in x 576 out: 64 rows 0.66 vs 0.72, 128 rows 1.32 vs 0.97, 512 rows 5.27 vs
# 2.71 (dense alone 2.09); the other SmolLM2 shapes cross over between 64 and 128 rows as well.
PREFILL_ROWS = 128


def _bias(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.detach().to(dtype).clone()


def _channel_offset(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor | None:
    """A per-channel layer's offset ``b`` in ``dtype``, or None for a symmetric layer (which then skips the
    ``rowsum(x) * b`` correction entirely: one fewer op per call)."""
    offset = layer.offset[:, 0]
    return offset.to(dtype).contiguous() if offset.any() else None


def _as_2d(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


class DequantLinear(nn.Module):
    """The dequantize reference with the weight materialised once in ``dtype``."""

    def __init__(self, layer: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        self.register_buffer("weight", layer.dequantize_weight().to(dtype).contiguous())
        self.register_buffer("bias", _bias(layer, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits} (dequantized)"


def int4_codes(layer: QuantizedLinear) -> torch.Tensor:
    """Codes of a 2/3/4-bit layer shifted into the int4 kernel's unsigned range: ``u4 = q + 8`` (int32)."""
    return layer.codes().to(torch.int32) + 8


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes ``u4`` (out, in) in the int4 kernel's weight layout for the device they are on.

    CPU: ``_convert_weight_to_int4pack_for_cpu`` takes the int32 codes. CUDA (PyTorch >= 2.5): the tinygemm
    conversion ``_convert_weight_to_int4pack(uint8 (out, in/2), inner_k_tiles)`` takes two codes per byte, the
    even column in the high nibble (:func:`qaft.quant.packing.pack_codes`' 4-bit layout), and returns int32
    ``(out/8, in/(16 inner_k_tiles), 32, inner_k_tiles/2)``; ``inner_k_tiles`` is the widest of 8, 4, 2 whose
    k-tile ``16 inner_k_tiles`` divides ``in`` (``in % 32 == 0`` is required, so 2 always does).
    """
    if codes.is_cuda:
        codes = codes.to(torch.uint8)
        packed = (codes[:, ::2] << 4 | codes[:, 1::2]).contiguous()
        tiles = next(t for t in (8, 4, 2) if codes.shape[1] % (16 * t) == 0)
        return torch.ops.aten._convert_weight_to_int4pack(packed, tiles)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def _int4_mm(x: torch.Tensor, weight: torch.Tensor, group_size: int, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    mm = torch.ops.aten._weight_int4pack_mm if x.is_cuda else torch.ops.aten._weight_int4pack_mm_for_cpu
    return mm(x, weight, group_size, scales_and_zeros)


@torch.no_grad()
def unpack_int4(weight: torch.Tensor, in_features: int, out_features: int, group_size: int,
                rows: int = 1024) -> torch.Tensor:
    """The codes ``u4`` (out, in), int32, of a weight in either kernel's layout, read through the kernel itself.

    With scale 1 and zero 8 the kernel's weight is ``(u4 - 8) * 1 + 8 = u4``, so multiplying the identity by it
    returns the codes, transposed; they are integers 0..15, exact in bf16. One layout-free inverse for both
    devices (the CUDA tile layout is nowhere written down as a formula); ``rows`` identity rows at a time.
    """
    dev = weight.device
    unit = torch.tensor([1.0, 8.0], dtype=torch.bfloat16, device=dev)
    scales_and_zeros = unit.expand(in_features // group_size, out_features, 2).contiguous()
    parts = []
    for start in range(0, in_features, rows):
        n = min(rows, in_features - start)
        eye = torch.zeros(n, in_features, dtype=torch.bfloat16, device=dev)
        eye[torch.arange(n, device=dev), start + torch.arange(n, device=dev)] = 1
        parts.append(_int4_mm(eye, weight, group_size, scales_and_zeros).to(torch.int32))
    return torch.cat(parts).T.contiguous()


class Int4Linear(nn.Module):
    """PyTorch's int4 weight-only GEMM: ``W = (u4 - 8) * scale + zero`` per group, zero = qaft's offset."""

    def __init__(self, layer: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        self.group_size = layer.group_size
        self.register_buffer("weight", pack_int4(int4_codes(layer).to(layer.qweight.device)))
        # (n_groups, out, 2): the kernels' scale-and-zero layout.
        self.register_buffer("scales_and_zeros", torch.stack([layer.scale.T, layer.offset.T], -1).to(dtype).contiguous())
        self.register_buffer("bias", _bias(layer, dtype))

    def codes(self) -> torch.Tensor:
        """The unsigned codes ``u4`` (out, in), int32, read back out of the kernel layout (:func:`unpack_int4`)."""
        return unpack_int4(self.weight, self.in_features, self.out_features, self.group_size)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> Int4Linear:
        """``.to(device)`` / ``.cuda()`` / ``.cpu()``: the CPU and CUDA kernels take different weight layouts, so
        a move across device types repacks the codes for the new device (a move of the bytes alone would hand
        one kernel the other's layout). Dtype casts leave the integer weight alone, as for any module."""
        target = fn(self.weight[:0]).device  # where fn sends a tensor: an empty view costs nothing to move
        if target.type == self.weight.device.type:
            return super()._apply(fn, recurse)
        codes = self.codes()
        super()._apply(fn, recurse)
        self.weight = pack_int4(codes.to(target))
        return self

    def dense_weight(self) -> torch.Tensor:
        """``W = (u4 - 8) * scale + zero`` unpacked from the CPU kernel's layout ((out/64, in, 32) bytes: row
        ``64b + j`` in the low nibble, row ``64b + 32 + j`` in the high one), in the scales' dtype.

        Built as ``W.T`` (in, out) and returned as its transposed view: reading the bytes in their stored order
        with only whole 32-byte runs moved is ~2.5x faster than transposing them, and the GEMM takes either
        layout. The arithmetic runs in float32 in place and is rounded once at the end (as the kernel computes):
        bf16 elementwise ops are slower on CPU. Measured: experiments/bench/int4_unpack.py."""
        n, k = self.out_features, self.in_features
        packed = self.weight.view(n // 64, k, 32)
        w_t = torch.empty(k, n // 64, 2, 32)
        w_t[:, :, 0].copy_((packed & 15).transpose(0, 1))
        w_t[:, :, 1].copy_((packed >> 4).transpose(0, 1))
        scale, zero = (self.scales_and_zeros[..., i].float()[:, None, :] for i in (0, 1))  # (groups, 1, out)
        w_t.view(k // self.group_size, self.group_size, n).sub_(8).mul_(scale).add_(zero)
        return w_t.view(k, n).to(self.scales_and_zeros.dtype).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _as_2d(x.to(self.scales_and_zeros.dtype))
        if not x2.is_cuda and x2.shape[0] >= PREFILL_ROWS and self.out_features % 64 == 0:
            y = F.linear(x2, self.dense_weight())  # prefill: unpack once per call, then the dense GEMM
        else:
            y = _int4_mm(x2, self.weight, self.group_size, self.scales_and_zeros)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size} (int4 kernel)"


class Int8Linear(nn.Module):
    """``_weight_int8pack_mm`` (per-channel scale) plus the exact offset term ``rowsum(x) * b``."""

    def __init__(self, layer: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        self.register_buffer("weight", layer.codes().contiguous())  # int8, (out, in)
        self.register_buffer("scales", layer.scale[:, 0].to(dtype).contiguous())
        self.register_buffer("offset", _channel_offset(layer, dtype))
        self.register_buffer("bias", _bias(layer, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = _as_2d(x.to(self.scales.dtype))
        y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales)
        if self.offset is not None:
            # Sum in float32: a bf16 row sum of hundreds of activations loses the offset's precision.
            y = y + (x2.float().sum(-1, keepdim=True) * self.offset.float()).to(y.dtype)
        y = y.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8, per-channel (int8 kernel)"


# cuBLAS's int8 GEMM behind torch._int_mm on CUDA takes more than this many rows only (a decode step has one).
CUDA_INT_MM_MIN_ROWS = 17


def _int_mm(codes: torch.Tensor, weight_t: torch.Tensor) -> torch.Tensor:
    """``torch._int_mm``, with a CUDA input of too few rows padded by zero rows (their outputs are dropped)."""
    rows = codes.shape[0]
    if codes.is_cuda and rows < CUDA_INT_MM_MIN_ROWS:
        return torch._int_mm(F.pad(codes, (0, 0, 0, CUDA_INT_MM_MIN_ROWS - rows)), weight_t)[:rows]
    return torch._int_mm(codes, weight_t)


def has_kernel(op: str, device: torch.device) -> bool:
    """Whether this PyTorch build registers ``aten::op`` for ``device`` (CUDA ``_weight_int8pack_mm`` is recent)."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"aten::{op}", device.type.upper())


class Int8x8Linear(nn.Module):
    """W8A8: int8 per-token activation codes times int8 per-channel weight codes (``torch._int_mm``, int32
    accumulation), rescaled in float32; the offset ``b`` enters exactly as ``s_x rowsum(c_x) b``."""

    input_bits = 8  # quantizes its own input: replace_module does not carry an 8-bit input quantizer to it

    def __init__(self, layer: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        self.register_buffer("weight_t", layer.codes().T.contiguous())  # int8, (in, out): _int_mm's layout
        self.register_buffer("scales", layer.scale[:, 0].float().contiguous())
        self.register_buffer("offset", _channel_offset(layer, torch.float32))
        self.register_buffer("bias", _bias(layer, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = quantize_per_token(_as_2d(x), 8)
        acc = _int_mm(codes, self.weight_t).float()
        y = acc * self.scales
        if self.offset is not None:
            y = y + codes.float().sum(-1, keepdim=True) * self.offset
        y = (y * scale).to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits=8, act_bits=8, per-channel (int8 x int8)"


def int8x8_applicable(layer: QuantizedLinear, device: torch.device) -> bool:
    """A per-channel 8-bit layer whose input is quantized at 8 bits per token (a W8A8 layer)."""
    quantizer = getattr(layer, INPUT, None)
    return isinstance(quantizer, PerTokenQuantizer) and quantizer.bits == 8 and layer.bits == 8 \
        and layer.scale.shape[1] == 1 and device.type in ("cpu", "cuda") \
        and (device.type == "cpu" or layer.in_features % 8 == layer.out_features % 8 == 0)  # cuBLAS int8 shapes


def int4_applicable(layer: QuantizedLinear, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the int4 kernel accepts this layer (its shape constraints) for activations of ``dtype``."""
    if layer.bits > 4 or layer.group_size not in INT4_GROUP_SIZES or layer.in_features % layer.group_size:
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and layer.in_features % 32 == 0 and layer.out_features % 8 == 0 \
            and torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16)


def int8_applicable(layer: QuantizedLinear, dtype: torch.dtype, device: torch.device) -> bool:
    """The int8 kernel has one scale per output channel: per-channel 8-bit layers only."""
    return layer.bits == 8 and layer.scale.shape[1] == 1 and device.type in ("cpu", "cuda") \
        and dtype in (torch.float32, torch.bfloat16, torch.float16) and has_kernel("_weight_int8pack_mm", device)


def _kernel_is_fast(dtype: torch.dtype, device: torch.device) -> bool:
    """Where the kernels beat the dense GEMM (measurements in the module docstring): CUDA, or CPU with
    half-precision activations. Deliberately not keyed on the CPU capability: the fp32 CPU paths were slower
    than dense fp32 on AVX2 and on AVX512 alike."""
    return device.type == "cuda" or dtype in (torch.bfloat16, torch.float16)


def _int_mm_is_fast(dtype: torch.dtype, device: torch.device) -> bool:
    """Where ``torch._int_mm`` beat the fake-quantized dense GEMM it replaces (measured: module docstring): CPU
    with half-precision activations."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def inference_layer(layer: QuantizedLinear, dtype: torch.dtype, backend: Backend = "auto") -> nn.Module:
    """The fastest correct inference layer for ``layer`` computing in ``dtype`` (see the module docstring)."""
    if backend not in ("auto", "kernel", "dequant"):
        raise ValueError(f"backend must be 'auto', 'kernel' or 'dequant', got {backend!r}")
    device = layer.qweight.device
    if backend != "dequant":
        force = backend == "kernel"
        if int8x8_applicable(layer, device) and (force or _int_mm_is_fast(dtype, device)):
            return Int8x8Linear(layer, dtype)
        if int4_applicable(layer, dtype, device) and (force or _kernel_is_fast(dtype, device)):
            return Int4Linear(layer, dtype)
        if int8_applicable(layer, dtype, device) and (force or _kernel_is_fast(dtype, device)):
            return Int8Linear(layer, dtype)
    return DequantLinear(layer, dtype)


def _float_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


@torch.no_grad()
def prepare_for_inference(model: nn.Module, dtype: torch.dtype | None = None,
                          backend: Backend = "auto", fuse: bool = False) -> nn.Module:
    """Swap every ``QuantizedLinear`` of ``model`` (in place) for an inference layer; returns ``model``.

    ``dtype``: compute dtype of activations and of every float tensor of the model (default: the model's
    current float dtype). ``fuse``: first merge q/k/v and gate/up into one layer each
    (:func:`qaft.deploy.fuse.fuse_projections`; float models too). The swapped model keeps the same call
    signature, so ``generate()`` works on it. The output projection becomes a
    :class:`~qaft.deploy.gemv.OneRowLinear` (the same result; faster one-token steps once compiled).
    """
    dtype = dtype or _float_dtype(model)
    if fuse:
        from qaft.deploy.fuse import fuse_projections  # imports transformers' Llama module
        fuse_projections(model)
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, layer in targets:  # replace_module: the activation / KV quantizers stay with the position
        replace_module(model, name, inference_layer(layer, dtype, backend))
    one_row_output(model)
    model.to(dtype)  # floating tensors only: packed codes stay integer
    model.eval()
    return model


def backend_counts(model: nn.Module) -> dict[str, int]:
    """How many layers took each path (for logs and benchmarks)."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, (Int4Linear, Int8Linear, Int8x8Linear, DequantLinear, QuantizedLinear)):
            counts[type(m).__name__] = counts.get(type(m).__name__, 0) + 1
    return counts

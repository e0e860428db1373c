"""EfficientQAT (Chen et al. 2024, https://arxiv.org/abs/2407.11062): Block-AP, then E2E-QP. One run does both.

1. **Block-AP** (:mod:`qaft.methods.block_ap`), a calibration step before training: block by block, every weight
   ``W`` of the block and its quantizer (``s, b``, or ``s, z`` on the integer-zero grid) train through the shared
   quantizer's straight-through gradients to minimise the MSE between the quantized block's output and the float
   model's output of that block, on ``calib_batches`` batches of the training stream (the quantized block's
   inputs come from the already quantized blocks before it), ``block_ap_epochs`` passes. Each layer then keeps
   only its integer codes ``q = clamp(round((W - b) / s), Qn, Qp)`` and its quantizer; ``W`` is dropped.
2. **E2E-QP**, the trained phase: the codes stay fixed and only the step sizes ``s`` train, end to end on the
   training data with the normal LM loss (as PEQA)::

       Wq = s * q + b,    b = s (2^(n-1) - z)  with the integer zero z frozen (zero_point="int", the paper's grid)
                          b fixed               (zero_point="float")

   so ``dL/ds = sum_group(G * q) + (2^(n-1) - z) sum_group(G)`` (resp. without the second term), ``G = grad^T x``.
   The layer's backward (:class:`_ScaleOnlyLinear`) saves only ``x``, the int8 codes and the per-group ``s, b``
   and rebuilds ``Wq`` when it needs it, instead of keeping a float weight per layer until backward.

Deployed: the codes with the trained ``s`` and its ``b`` (:class:`~qaft.quant.linear.QuantizedLinear`), computed
by the functions the training forward calls, so the merged model is the trained one bit for bit.

``block_ap_epochs=0`` skips Block-AP (E2E-QP on the round-to-nearest start, the paper's "E2E-QP only" ablation)
and needs no data. A resumed run recomputes Block-AP from the same batches (nothing in it is random); the
checkpoint holds ``s`` (and the frozen ``z`` / ``b``), and the codes' digest proves the rebuild equal
(:class:`qaft.training.module.QaftModule`). The public code's Block-AP settings are the defaults (2 epochs, lr
1e-4 for ``s, z`` and 1e-5 for ``W``, AdamW without weight decay, cosine to lr/20, no gradient clipping).

Where qaft differs from the public code (``OpenGVLab/EfficientQAT``, ``quantize/block_ap.py``, ``quantizer.py``,
``main_e2e_qp.py``):

* calibration data: the first ``calib_batches`` batches of the run's training stream, not 4,096 RedPajama
  sequences of 2,048 tokens; one optimizer step per batch (the public code: 2 sequences per step); no validation
  set or early stopping (off by default there too);
* the grid: the shared quantizer's (``zero_point="int"``, the preset's, is the public code's ``s (u - z)`` with
  ``z = clamp(round(z), 0, 2^n - 1)`` trained straight-through; ``"float"`` is offered too). Its min-max start
  widens the range to include 0 (GPTQ's reference quantizer), the public code's does not; the public code clamps
  ``s`` to [1e-4, 1e4], qaft keeps ``s`` positive from its start only;
* precision: Block-AP computes in the model's dtype with float32 weights and quantizer (the public code: fp16
  autocast), and E2E-QP trains float32 scales (the public code's packed layer holds them in fp16).
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.block_ap import block_ap
from qaft.methods.config import (
    INTEGER,
    TRAIN,
    CalibrationFields,
    MethodTraits,
    QuantMethodConfig,
    non_negative,
    register,
)
from qaft.methods.layer import QUANTIZER, QaftLinear, make_quantizer
from qaft.methods.qat import QATLinear
from qaft.quant.affine import dequantize
from qaft.quant.gptq import GPTQOptions
from qaft.quant.granularity import grouped
from qaft.quant.linear import QuantizedLinear
from qaft.quant.module import AffineQuantizer


class _ScaleOnlyLinear(torch.autograd.Function):
    """``x Wq^T + bias`` with ``Wq = s q + b`` per group and frozen codes ``q``; gradients for ``x``, ``s``, ``b``.

    Saves ``x``, the int8 codes and ``s, b``; ``Wq`` is rebuilt in backward (the same ``dequantize`` as the
    forward and the deployed layer). ``ds = sum_group(G q)``, ``db = sum_group(G)`` with ``G = grad^T x``, each times
    ``grad_scale`` (LSQ's gradient scale where enabled, else 1).
    """

    @staticmethod
    def forward(ctx, x, codes, scale, offset, bias, grad_scale):
        ctx.save_for_backward(x, codes, scale, offset)
        ctx.grad_scale = grad_scale
        w = dequantize(codes, scale, offset).to(x.dtype)
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, codes, scale, offset = ctx.saved_tensors
        gx = gs = gb = None
        if ctx.needs_input_grad[0]:
            gx = grad @ dequantize(codes, scale, offset).to(grad.dtype)
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            g2 = grad.reshape(-1, grad.shape[-1]).to(scale.dtype)
            gw = grouped(g2.T @ x.reshape(-1, x.shape[-1]).to(scale.dtype), scale.shape[-1])
            if ctx.needs_input_grad[2]:
                gs = (gw * grouped(codes.to(scale.dtype), scale.shape[-1])).sum(-1) * ctx.grad_scale
            if ctx.needs_input_grad[3]:
                gb = gw.sum(-1) * ctx.grad_scale
        return gx, None, gs, gb, None, None


def scale_only_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      bias: torch.Tensor | None = None, grad_scale: float = 1.0) -> torch.Tensor:
    """``F.linear(x, dequantize(codes, scale, offset), bias)`` with the memory-light backward above."""
    return _ScaleOnlyLinear.apply(x, codes, scale, offset, bias, grad_scale)


class EfficientQATLinear(QaftLinear):
    """E2E-QP's layer: frozen int8 ``codes``, the layer's quantizer of which only ``scale`` trains."""

    PHASES: ClassVar = {TRAIN: frozenset({QUANTIZER})}

    def __init__(self, codes: torch.Tensor, quantizer: AffineQuantizer, bias: torch.Tensor | None,
                 config: EfficientQATConfig) -> None:
        out_features, in_features = codes.shape
        super().__init__(in_features, out_features, bias, config)
        self.register_buffer("codes", codes.to(torch.int8))
        self.quantizer = quantizer
        self._freeze_grid()

    @classmethod
    def from_trained(cls, layer: QATLinear, config: EfficientQATConfig) -> EfficientQATLinear:
        """The layer after Block-AP: the codes of its trained weight under its trained quantizer."""
        return cls(layer.quantizer.codes(layer.weight), layer.quantizer, layer.bias, config)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: EfficientQATConfig) -> EfficientQATLinear:
        """Without Block-AP: the round-to-nearest codes under the config's ``init``."""
        weight = linear.weight.detach().float()
        quantizer = make_quantizer(weight, config)
        return cls(quantizer.codes(weight), quantizer, linear.bias, config)

    def _freeze_grid(self) -> None:
        """E2E-QP trains ``s`` alone: the zero point ``z`` (or the float offset ``b``) never does."""
        for name, param in self.quantizer.named_parameters():
            if name != "scale":
                param.requires_grad_(False)

    def set_phase(self, phase: str) -> None:
        super().set_phase(phase)
        self._freeze_grid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        return scale_only_linear(x, self.codes, q.scale, q.current_offset(), self.bias, q.grad_scale)

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        q = self.quantizer
        return QuantizedLinear(self.codes, q.scale, q.current_offset(), q.bits, self.bias)


def _check_lr(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@register
@dataclass(kw_only=True)
class EfficientQATConfig(QuantMethodConfig, CalibrationFields):
    """EfficientQAT; Block-AP's ``block_ap_epochs`` passes over ``calib_batches`` batches (0: no Block-AP, no
    data) at ``block_ap_quant_lr`` (``s, b`` or ``s, z``) and ``block_ap_weight_lr`` (``W``)."""

    name = "efficientqat"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True, trains_quantizer=True)
    example_fields: ClassVar = {"group_size": 32, "block_ap_epochs": 1, "calib_batches": 2}
    calibrated_fields: ClassVar = ({"block_ap_epochs": 1},)
    block_ap_epochs: int = 2
    block_ap_quant_lr: float = 1e-4
    block_ap_weight_lr: float = 1e-5

    def validate(self) -> None:
        super().validate()
        GPTQOptions(calib_batches=self.calib_batches)  # the one check of a batch count
        non_negative("block_ap_epochs", self.block_ap_epochs)
        _check_lr("block_ap_quant_lr", self.block_ap_quant_lr)
        _check_lr("block_ap_weight_lr", self.block_ap_weight_lr)
        if self.block_ap_epochs and not (self.block_ap_quant_lr or self.block_ap_weight_lr):
            raise ValueError("Block-AP needs block_ap_quant_lr or block_ap_weight_lr above 0 "
                             "(or block_ap_epochs=0 to skip it)")

    def calibration_options(self) -> GPTQOptions | None:
        return GPTQOptions(calib_batches=self.calib_batches) if self.block_ap_epochs else None

    def apply_calibrated(self, model: nn.Module, calib_batches: Iterable[Any]) -> None:
        """Block-AP of the whole model; its target linears become :class:`EfficientQATLinear`."""
        block_ap(model, calib_batches, self, lambda layer: EfficientQATLinear.from_trained(layer, self))

    def make_layer(self, linear: nn.Linear) -> EfficientQATLinear:
        if self.block_ap_epochs:
            raise ValueError("efficientqat with block_ap_epochs > 0 needs calibration data for Block-AP: use "
                             "qaft.apply_method(model, config, calib_batches=batches)")
        return EfficientQATLinear.from_linear(linear, self)

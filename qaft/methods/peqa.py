"""PEQA (Kim et al. 2023, https://arxiv.org/abs/2305.14152): scale-only fine-tuning of a quantized base.

The base is quantized once, by round-to-nearest (``base_quant="rtn"``, the default) or GPTQ (``"gptq"``), into
integer codes ``q`` with per-group (per-channel in the paper, ``group_size=-1``) scale ``s`` and offset ``b``.
The codes never change; only the scales train::

    Wq = s * q + b,    y = x Wq^T

With a float offset (``zero_point="float"``) ``b`` is frozen as the base quantizer set it. On the integer-zero
grid (``zero_point="int"``) the integer zero ``z`` is frozen and ``b = s (2^(n-1) - z)`` moves with ``s``
(:func:`qaft.quant.affine.offset_of_zero`), as in the paper's ``s (q - z)``. No LoRA.

Gradients: ``dL/ds = groupsum(G * q)`` and ``dL/db = groupsum(G)`` with ``G = grad^T x`` (``out x in``), taken
by :class:`_ScaleOnlyLinear`, which saves only ``x`` and the small tensors (the int8 codes are held anyway) and
rebuilds ``Wq`` in backward, so no weight-sized float tensor stays alive per layer between forward and backward.
The scales are the layer's ``quantizer`` (:class:`~qaft.quant.module.AffineQuantizer`) whose offset or zero is
turned into a buffer: it is part of the frozen base, rebuilt with the codes when the method is applied again, so
training checkpoints keep only ``s``.

Merge: ``QuantizedLinear(q, s, b)`` with the trained ``s``: integer, and the training forward bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.config import (
    INTEGER,
    TRAIN,
    MethodTraits,
    QuantMethodConfig,
    register,
)
from qaft.methods.gptq_model import GPTQBaseFields
from qaft.methods.layer import QUANTIZER, QaftLinear, make_quantizer
from qaft.quant.affine import dequantize
from qaft.quant.granularity import grouped
from qaft.quant.linear import QuantizedLinear
from qaft.quant.module import AffineQuantizer

BASES = ("rtn", "gptq")


class _ScaleOnlyLinear(torch.autograd.Function):
    """``x (s q + b)^T`` for frozen codes ``q``; gradients to ``x``, ``s`` and ``b`` (see the module doc)."""

    @staticmethod
    def forward(ctx, x, codes, scale, offset, grad_scale):
        ctx.save_for_backward(x, codes, scale, offset)
        ctx.grad_scale = grad_scale
        return F.linear(x, dequantize(codes, scale, offset).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, codes, scale, offset = ctx.saved_tensors
        need_x, _, need_s, need_b, _ = ctx.needs_input_grad
        dx = grad @ dequantize(codes, scale, offset).to(grad.dtype) if need_x else None
        ds = db = None
        if need_s or need_b:
            # bf16-mixed: grad arrives in bf16 beside a float32 x; the GEMM runs in grad's dtype, as autocast's
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad.dtype)
            g = grouped((g2.T @ x2).to(scale.dtype), scale.shape[1]).mul_(ctx.grad_scale)  # LSQ's, if on
            db = g.sum(-1) if need_b else None
            ds = g.mul_(grouped(codes.to(scale.dtype), scale.shape[1])).sum(-1) if need_s else None
        return dx, None, ds, db, None


def scale_only_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
                      grad_scale: float = 1.0) -> torch.Tensor:
    """``x (s q + b)^T`` with the codes ``q`` (int8) frozen; the memory-saving backward of PEQA (``grad_scale``:
    LSQ's factor on the gradients of ``s`` and ``b``, ``lsq_grad_scale=True``)."""
    return _ScaleOnlyLinear.apply(x, codes, scale, offset, grad_scale)


def _freeze_offset(quantizer: AffineQuantizer) -> AffineQuantizer:
    """The quantizer with its offset (or integer zero) a buffer: only ``scale`` remains a parameter."""
    for name in ("offset", "zero"):
        param = quantizer._parameters.get(name)
        if param is not None:
            delattr(quantizer, name)
            quantizer.register_buffer(name, param.detach())
    return quantizer


class PEQALinear(QaftLinear):
    """Frozen integer codes ``q`` (int8 buffer ``codes``) and their quantizer, of which only ``s`` trains."""

    PHASES = {TRAIN: frozenset({QUANTIZER})}

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, config: PEQAConfig,
                 weight: torch.Tensor, base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        """``weight``: the float weight the quantizer is fitted on; ``base``: an existing ``(codes, scale,
        offset)`` (GPTQ's) to take over instead of the round-to-nearest one of ``weight``."""
        super().__init__(in_features, out_features, bias, config)
        self.quantizer = _freeze_offset(make_quantizer(weight, config))
        q = self.quantizer
        if base is not None:
            codes, scale, offset = base
            # On the integer grid GPTQ stores b = s (2^(n-1) - z): z is recovered exactly (an integer ratio)
            state = (2 ** (config.bits - 1) - offset / scale).round() if q.learns_zero else offset
            q.assign(scale, state)
        else:
            codes = q.codes(weight)
        frozen = "zero" if q.learns_zero else (None if config.symmetric else "offset")
        self._frozen_state = () if frozen is None else (f"{QUANTIZER}.{frozen}",)
        self.register_buffer("codes", codes)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: PEQAConfig) -> PEQALinear:
        """PEQA on the round-to-nearest base of a float layer (the config's quantizer settings)."""
        return cls(linear.in_features, linear.out_features, linear.bias, config, linear.weight.detach().float())

    @classmethod
    def from_quantized(cls, qlinear: QuantizedLinear, config: PEQAConfig) -> PEQALinear:
        """PEQA on an existing integer layer's codes, scales and offsets (GPTQ's)."""
        base = (qlinear.codes(), qlinear.scale.clone(), qlinear.offset.clone())
        return cls(qlinear.in_features, qlinear.out_features, qlinear.bias, config, qlinear.dequantize_weight(), base)

    def state_buffers(self) -> list[str]:
        """The frozen offset / zero belongs to the base (rebuilt with the codes), so checkpoints keep only ``s``
        (and a symmetric quantizer's zero offset, as every quantizer's)."""
        return [name for name in super().state_buffers() if name not in self._frozen_state]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.quantizer
        return self._add_bias(scale_only_linear(x, self.codes, q.scale, q.current_offset(), q.grad_scale))

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        q = self.quantizer
        return QuantizedLinear(self.codes, q.scale, q.current_offset(), q.bits, self.bias)


@register
@dataclass(kw_only=True)
class PEQAConfig(GPTQBaseFields, QuantMethodConfig):
    """PEQA; ``calib_batches``, ``act_order`` and ``percdamp`` apply with ``base_quant='gptq'``."""

    name = "peqa"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True, trains_quantizer=True, starts_at_ptq=True)
    example_fields: ClassVar = {"group_size": 32}
    calibrated_fields: ClassVar = ({"base_quant": "gptq"},)
    base_layer: ClassVar = PEQALinear

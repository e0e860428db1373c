"""LoftQ (Li et al. 2023, https://arxiv.org/abs/2310.08659): a LoRA initialisation for a quantized base.

Start with ``R = W``. For ``T`` iterations: ``Q = quant(R)``; the rank-r SVD of ``W - deq(Q)`` gives
``U S V^T``; set ``alpha B = U_r S_r^(1/2)``, ``A = S_r^(1/2) V_r^T`` and ``R = W - alpha B A``. The base becomes
``deq(Q)`` and ``alpha B A`` (not ``B A``) equals the low-rank residual, so the model starts closer to ``W``
than plain quantization. ``quant`` is NF4 (QLoRA's base) or the integer quantizer; the layer is the one of
:mod:`qaft.methods.frozen_base` for that base, holding exactly the last iteration's ``Q``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qaft.methods.config import FLOAT, MethodTraits, QuantLoRAMethodConfig, choice, register
from qaft.methods.frozen_base import FrozenBaseLoRALinear, IntBaseLoRALinear
from qaft.quant.affine import dequantize
from qaft.quant.linear import rtn_quantize
from qaft.quant.nf4 import nf4_dequantize, nf4_quantize

BASES = ("nf4", "int")


def loftq_factors(w: torch.Tensor, quant_dequant, rank: int, scaling: float, iters: int):
    """``(deq(Q), Q, A, B)`` after ``iters`` LoftQ alternations.

    ``quant_dequant(R)`` returns ``(deq(quant(R)), quant(R))``.
    """
    w = w.float()
    residual = w
    for _ in range(iters):
        base, state = quant_dequant(residual)
        u, s, vh = torch.linalg.svd(w - base, full_matrices=False)
        # A rank above min(out, in) leaves the extra LoRA directions at zero.
        r = min(rank, s.numel())
        root = s[:r].sqrt()
        b = torch.zeros(w.shape[0], rank)
        a = torch.zeros(rank, w.shape[1])
        b[:, :r] = u[:, :r] * root / scaling
        a[:r] = root[:, None] * vh[:r]
        residual = w - scaling * (b @ a)
    return base, state, a, b


@register
@dataclass(kw_only=True)
class LoftQConfig(QuantLoRAMethodConfig):
    """LoftQ over NF4 (``base='nf4'``: QLoRA's layer, ``bits`` must be 4) or an integer base (``base='int'``)."""

    name = "loftq"
    traits = MethodTraits(merges_to=FLOAT)
    example_fields: ClassVar = {"loftq_iters": 2}
    int_zero_fields: ClassVar = {"base": "int"}
    rank: int = 64  # as QLoRA, whose initialisation it is
    base: str = "nf4"
    loftq_iters: int = 1
    double_quant: bool = False  # as peft's loftq_init (compress_statistics=False) and LoftQ's released models

    def validate(self) -> None:
        super().validate()
        choice("base", self.base, BASES)
        if self.base == "nf4" and self.bits != 4:
            raise ValueError(f"bits must be 4 with base='nf4' (NF4 is a 4-bit format), got {self.bits}")
        if self.base == "nf4" and self.zero_point != "float":
            raise ValueError("zero_point applies to the integer base only (base='int'); NF4 has no zero point")
        if not isinstance(self.loftq_iters, int) or self.loftq_iters < 1:
            raise ValueError(f"loftq_iters must be a positive integer, got {self.loftq_iters!r}")

    def quant_dequant(self, w: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        if self.base == "nf4":
            t = nf4_quantize(w, double_quant=self.double_quant)
            return nf4_dequantize(t), tuple(t.tensors().values())
        codes, s, b = rtn_quantize(w, self.bits, self.group_size, self.init, self.symmetric, self.zero_point)
        return dequantize(codes, s, b), (codes, s, b)

    def make_layer(self, linear: nn.Linear) -> FrozenBaseLoRALinear:
        base, state, a, b = loftq_factors(linear.weight.detach(), self.quant_dequant, self.rank, self.scaling,
                                          self.loftq_iters)
        layer_cls = FrozenBaseLoRALinear if self.base == "nf4" else IntBaseLoRALinear
        layer = layer_cls(linear, self, base=base)
        with torch.no_grad():
            # Keep exactly the Q of the last iteration (re-quantizing deq(Q) could move a clipped range).
            for buffer, value in zip(layer.base_state(), state):
                buffer.copy_(value)
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
        return layer

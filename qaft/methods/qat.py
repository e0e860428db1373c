"""Full QAT with LSQ+ (Esser et al. 2019; Bhalgat et al. 2020): ``W`` itself trains through the quantizer.

``y = x Q_{s,b}(W)^T``; ``W, s, b`` train. The memory reference that L4Q and DL-QAT are measured
against (full weight gradients and optimizer state). Merge: integer codes of the trained ``W``.
``zero_point="int"``: ``s`` and an integer zero ``z`` train instead of ``b`` (straight-through round, as in
:mod:`qaft.methods.l4q`); the merged offset is computed by the same function, so merged == trained bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.config import TRAIN, QuantMethodConfig, register
from qaft.methods.l4q import QUANTIZER, grad_scale_of, layer_offset, quantizer_state
from qaft.methods.layer import QaftLinear
from qaft.quant.affine import fake_quantize, quantize
from qaft.quant.linear import QuantizedLinear


class QATLinear(QaftLinear):
    PHASES = {TRAIN: frozenset({"weight"}) | QUANTIZER}

    def __init__(self, linear: nn.Linear, config: "QATConfig") -> None:
        super().__init__(linear, config)
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        quantizer_state(self, self.weight.detach(), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wq = fake_quantize(self.weight, self.scale, layer_offset(self), self.config.bits, grad_scale_of(self))
        return self._add_bias(F.linear(x, wq.to(x.dtype)))

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        offset = layer_offset(self)
        codes = quantize(self.weight, self.scale, offset, self.config.bits)
        return QuantizedLinear(codes, self.scale, offset, self.config.bits, self.bias)


@register
@dataclass(kw_only=True)
class QATConfig(QuantMethodConfig):
    name = "qat"

    def make_layer(self, linear: nn.Linear) -> QATLinear:
        return QATLinear(linear, self)

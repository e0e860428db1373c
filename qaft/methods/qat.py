"""Full QAT with LSQ+ (Esser et al. 2019; Bhalgat et al. 2020): ``W`` itself trains through the quantizer.

``y = x Q_{s,b}(W)^T``; ``W`` and the layer's ``quantizer`` (``s, b``) train. The memory reference that L4Q and
DL-QAT are measured against (full weight gradients and optimizer state). Merge: integer codes of the trained ``W``.
``zero_point="int"``: ``s`` and an integer zero ``z`` train instead of ``b`` (straight-through round, as in
:mod:`qaft.methods.l4q`); the merged offset is computed by the same function, so merged == trained bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.config import INTEGER, TRAIN, MethodTraits, QuantMethodConfig, register
from qaft.methods.layer import QUANTIZER, QaftLinear, make_quantizer
from qaft.quant.affine import quantize
from qaft.quant.linear import QuantizedLinear


class QATLinear(QaftLinear):
    PHASES = {TRAIN: frozenset({"weight", QUANTIZER})}

    def __init__(self, linear: nn.Linear, config: "QATConfig") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, config)
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        self.quantizer = make_quantizer(self.weight.detach(), config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._add_bias(F.linear(x, self.quantizer(self.weight).to(x.dtype)))

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        q = self.quantizer
        offset = q.current_offset()
        return QuantizedLinear(quantize(self.weight, q.scale, offset, q.bits), q.scale, offset, q.bits, self.bias)


@register
@dataclass(kw_only=True)
class QATConfig(QuantMethodConfig):
    name = "qat"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True, trains_quantizer=True, trains_weights=True,
                          starts_at_ptq=True)
    example_fields: ClassVar = {"group_size": 32}

    def make_layer(self, linear: nn.Linear) -> QATLinear:
        return QATLinear(linear, self)

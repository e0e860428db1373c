"""QLoRA (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314): LoRA over a frozen NF4 base.

``y = x deq(Q)^T + (alpha / r) x A^T B^T`` with ``Q`` NF4 (blocks of 64, double quantized by default as in the
paper); the layer is :class:`~qaft.methods.frozen_base.FrozenBaseLoRALinear`. Merge: ``deq(Q) + (alpha / r) B A``
is a float model; deploying it at n bits needs a PTQ afterwards (the papers' "QLoRA + PTQ" rows,
:func:`qaft.ptq_model`).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from qaft.methods.config import FLOAT, LoRAMethodConfig, MethodTraits, register
from qaft.methods.frozen_base import FrozenBaseLoRALinear


@register
@dataclass(kw_only=True)
class QLoRAConfig(LoRAMethodConfig):
    """QLoRA: NF4 base (4 bits, blocks of 64)."""

    name = "qlora"
    traits = MethodTraits(merges_to=FLOAT)
    rank: int = 64  # the paper's r (alpha 16)
    double_quant: bool = True  # the paper's setting: absmax constants in bitsandbytes' dynamic 8-bit map

    def make_layer(self, linear: nn.Linear) -> FrozenBaseLoRALinear:
        return FrozenBaseLoRALinear(linear, self)

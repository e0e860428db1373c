"""QAT-LoRA (torchtune style): LoRA outside a fake-quantized frozen ``W0``.

``y = x Q(W0)^T + (alpha / r) x A^T B^T``. ``W0``, ``s`` and ``b`` are frozen, so the fake-quantized base is
a constant integer base; only ``A, B`` train. Merge: ``Q(W0) + (alpha / r) B A``, float, needs PTQ to deploy.
``zero_point="int"`` puts the frozen base on the integer-zero grid; the float merge cannot keep it, and the PTQ
that deploys it has its own ``zero_point``. The layer is :class:`~qaft.methods.frozen_base.IntBaseLoRALinear`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from qaft.methods.config import FLOAT, MethodTraits, QuantLoRAMethodConfig, register
from qaft.methods.frozen_base import IntBaseLoRALinear


@register
@dataclass(kw_only=True)
class QATLoRAConfig(QuantLoRAMethodConfig):
    name = "qat_lora"
    traits = MethodTraits(merges_to=FLOAT, starts_at_ptq=True)
    example_fields: ClassVar = {"group_size": 32}

    def make_layer(self, linear: nn.Linear) -> IntBaseLoRALinear:
        return IntBaseLoRALinear(linear, self)

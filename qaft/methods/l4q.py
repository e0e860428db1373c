"""L4Q (Jeon et al. 2024, https://arxiv.org/abs/2402.04902): LoRA inside the quantizer.

``W' = W0 + alpha B A``, ``Wq = Q_{s,b}(W')``, ``y = x Wq^T``; ``A, B, s, b`` train. ``s, b`` start from an
initialisation on ``W0`` and ``B = 0``, so training starts at the PTQ point; they are the layer's ``quantizer``
(:class:`~qaft.quant.module.AffineQuantizer`). The backward is the memory-optimised one of
:mod:`qaft.methods.lowrank_qat`.

LoRA warm-up: for the first ``warmup_steps`` only ``A, B`` train, outside the quantizer
(``y = x Q(W0)^T + alpha x A^T B^T``, ``s, b`` frozen); then ``Q(W0 + alpha B A)`` with all four trainable.
Merge: codes ``clamp(round((W' - b) / s))`` with the final ``s, b``: the deployed model is the trained one.

``zero_point="int"``: ``s`` and an integer zero ``z`` (``quantizer.zero``) start from the integer-grid init and
train in place of ``b``; each step ``b = s (2^(n-1) - round(z))`` with a straight-through round (clamped to
``[0, 2^n - 1]``, :func:`qaft.quant.affine.offset_of_zero`), so the deployed offset is an integer multiple of the
scale and the merge computes ``b`` with the same function: still bit for bit the trained model.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qaft.methods.config import INTEGER, TRAIN, MethodTraits, QuantLoRAMethodConfig, non_negative, register
from qaft.methods.layer import QUANTIZER, QaftLinear, add_lora, lora_output, make_quantizer, recomputed_linear
from qaft.methods.lowrank_qat import lowrank_codes, lowrank_fake_quant_linear
from qaft.quant.affine import rtn_weight
from qaft.quant.linear import QuantizedLinear

WARMUP = "warmup"


class L4QLinear(QaftLinear):
    PHASES = {WARMUP: frozenset({"lora_A", "lora_B"}), TRAIN: frozenset({"lora_A", "lora_B", QUANTIZER})}

    def __init__(self, linear: nn.Linear, config: "L4QConfig") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, config)
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.quantizer = make_quantizer(self.weight.float(), config)
        add_lora(self, config.rank, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, q = self.config, self.quantizer
        if self.phase == WARMUP:
            y = recomputed_linear(x, functools.partial(rtn_weight, bits=q.bits),
                                  self.weight, q.scale.detach(), q.current_offset().detach())
            y = y + lora_output(x, self.lora_A, self.lora_B, c.scaling, c.dropout, self.training)
        else:
            y = lowrank_fake_quant_linear(x, self.weight, self.lora_A, self.lora_B, q.scale, q.current_offset(),
                                          None, c.scaling, q.bits, q.grad_scale, c.memory_efficient,
                                          c.compile_backward)
        return self._add_bias(y)

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        c, q = self.config, self.quantizer
        offset = q.current_offset()
        codes = lowrank_codes(self.weight, self.lora_A, self.lora_B, q.scale, offset, c.scaling, q.bits)
        return QuantizedLinear(codes, q.scale, offset, q.bits, self.bias)


@register
@dataclass(kw_only=True)
class L4QConfig(QuantLoRAMethodConfig):
    name = "l4q"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True, trains_quantizer=True, starts_at_ptq=True)
    example_fields: ClassVar = {"group_size": 32}
    init: str = "l4q"
    warmup_steps: int = 0
    memory_efficient: bool = True
    compile_backward: bool = False

    def validate(self) -> None:
        super().validate()
        non_negative("warmup_steps", self.warmup_steps)

    def phase_at(self, step: int) -> str:
        return WARMUP if step < self.warmup_steps else TRAIN

    def phase_boundaries(self) -> tuple[int, ...]:
        return (self.warmup_steps,) if self.warmup_steps else ()

    def make_layer(self, linear: nn.Linear) -> L4QLinear:
        return L4QLinear(linear, self)

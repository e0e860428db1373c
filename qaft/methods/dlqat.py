"""DL-QAT (Ke et al. 2024, https://arxiv.org/abs/2504.09223): weight-decomposed low-rank QAT.

``Wq = m * Q_{s,b}(W0 + alpha B A)`` with one learnable magnitude ``m`` per quantization group (init 1),
``A`` Gaussian, ``B = 0``, ``s, b`` from min-max. Phase 1 (``quant_steps``) trains only ``s, b`` (``W' = W0``)
and freezes them as ``s0, b0``; phase 2 trains ``m, A, B`` inside that fixed quantization space.
The paper's Table 3 varies ``magnitude`` (with or without ``m``) and ``clipping``:
``learned_fixed`` (the method: learn ``s, b``, then fix them), ``learned`` (``s, b, A, B`` (and ``m``) train
throughout, no phase 1), ``dynamic`` (``s, b`` are the min-max of ``W0 + alpha B A`` at every step, detached;
no phase 1). Merge: codes as L4Q, scale ``m s0``, offset ``m b0``: pure integer codes again.

``s, b`` (or ``s, z``) are the layer's ``quantizer`` (:class:`~qaft.quant.module.AffineQuantizer`); which members
train in which phase follows from the config (:meth:`DLQATLinear.phases`).

``zero_point="int"``: ``s`` and an integer zero ``z`` (``quantizer.zero``) take the place of ``s, b``; phase 1
learns ``z`` through a straight-through round, ``b = s (2^(n-1) - round(z))`` at every step, and ``dynamic``
clipping takes the integer-grid min-max of ``W0 + alpha B A`` each step. The deployed offset
``m b = m s (2^(n-1) - z) = (m s)(2^(n-1) - z)`` stays an integer multiple of the deployed scale ``m s`` (to one
float rounding: ``round(2^(n-1) - offset / scale)`` recovers ``z`` exactly, and the code ``z - 2^(n-1)``
dequantizes to 0 within an ulp of ``b`` rather than exactly; without ``m`` it is exactly 0).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qaft.methods.config import INTEGER, TRAIN, MethodTraits, QuantLoRAMethodConfig, choice, non_negative, register
from qaft.methods.layer import QUANTIZER, QaftLinear, add_lora, make_quantizer
from qaft.methods.lowrank_qat import lowrank_codes, lowrank_fake_quant_linear, lowrank_minmax
from qaft.quant.linear import QuantizedLinear

QUANT = "quant"
CLIPPING = ("learned_fixed", "learned", "dynamic")


class DLQATLinear(QaftLinear):
    def __init__(self, linear: nn.Linear, config: "DLQATConfig") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, config)
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        self.quantizer = make_quantizer(self.weight.float(), config)
        self.magnitude = nn.Parameter(torch.ones_like(self.quantizer.scale)) if config.magnitude else None
        add_lora(self, config.rank, self.in_features, self.out_features, gaussian=True)

    def phases(self) -> Mapping[str, frozenset[str]]:
        """Phase 1 learns the quantizer; phase 2 ``m, A, B`` (and the quantizer too with ``clipping='learned'``)."""
        c = self.config
        train = {"lora_A", "lora_B"} | ({"magnitude"} if c.magnitude else set())
        if c.clipping == "learned":
            train.add(QUANTIZER)
        return {QUANT: frozenset({QUANTIZER}), TRAIN: frozenset(train)}

    def _scale_offset(self) -> tuple[torch.Tensor, torch.Tensor]:
        c, q = self.config, self.quantizer
        if c.clipping != "dynamic":
            return q.scale, q.current_offset()
        s, state = lowrank_minmax(self.weight, self.lora_A, self.lora_B, c.scaling, c.bits, c.group_size,
                                  c.zero_point)
        q.assign(s, state)  # kept for inspection and checkpoints; merge recomputes them
        return s, q.offset_of(s, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        s, b = self._scale_offset()
        y = lowrank_fake_quant_linear(x, self.weight, self.lora_A, self.lora_B, s, b, self.magnitude,
                                      c.scaling, c.bits, self.quantizer.grad_scale, c.memory_efficient,
                                      c.compile_backward)
        return self._add_bias(y)

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        c = self.config
        s, b = self._scale_offset()
        codes = lowrank_codes(self.weight, self.lora_A, self.lora_B, s, b, c.scaling, c.bits)
        m = torch.ones_like(s) if self.magnitude is None else self.magnitude
        return QuantizedLinear(codes, m * s, m * b, c.bits, self.bias)


@register
@dataclass(kw_only=True)
class DLQATConfig(QuantLoRAMethodConfig):
    name = "dlqat"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True, trains_quantizer=True, starts_at_ptq=True)
    example_fields: ClassVar = {"group_size": 32, "quant_steps": 2}  # two quantizer steps, then LoRA steps
    quant_steps: int = 1000
    magnitude: bool = True
    clipping: str = "learned_fixed"
    memory_efficient: bool = True
    compile_backward: bool = False

    def validate(self) -> None:
        super().validate()
        non_negative("quant_steps", self.quant_steps)
        choice("clipping", self.clipping, CLIPPING)
        if self.clipping == "dynamic" and self.symmetric:
            raise ValueError("clipping='dynamic' uses asymmetric min-max bounds; set symmetric=False")

    def phase_at(self, step: int) -> str:
        return QUANT if self.clipping == "learned_fixed" and step < self.quant_steps else TRAIN

    def phase_boundaries(self) -> tuple[int, ...]:
        return (self.quant_steps,) if self.clipping == "learned_fixed" and self.quant_steps else ()

    def make_layer(self, linear: nn.Linear) -> DLQATLinear:
        return DLQATLinear(linear, self)

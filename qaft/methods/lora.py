"""LoRA (Hu et al. 2021, https://arxiv.org/abs/2106.09685), the float baseline.

``y = x W^T + (alpha / r) x A^T B^T`` with ``A`` Kaiming-uniform and ``B = 0``; ``W`` frozen.
Merge: ``W + (alpha / r) B A``, a float layer (deploying it at n bits needs PTQ afterwards).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.config import FLOAT, TRAIN, LoRAMethodConfig, MethodTraits, register
from qaft.methods.layer import QaftLinear, add_lora, float_linear, lora_delta, lora_output


class LoRALinear(QaftLinear):
    PHASES = {TRAIN: frozenset({"lora_A", "lora_B"})}

    def __init__(self, linear: nn.Linear, config: "LoRAConfig") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, config)
        self.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        add_lora(self, config.rank, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        y = F.linear(x, self.weight.to(x.dtype))
        return self._add_bias(y + lora_output(x, self.lora_A, self.lora_B, c.scaling, c.dropout, self.training))

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        merged = lora_delta(self, self.config.scaling).add_(self.weight)  # = W + alpha B A, in float32
        return float_linear(merged, self.bias, self.weight.dtype)


@register
@dataclass(kw_only=True)
class LoRAConfig(LoRAMethodConfig):
    name = "lora"
    traits = MethodTraits(merges_to=FLOAT)

    def make_layer(self, linear: nn.Linear) -> LoRALinear:
        return LoRALinear(linear, self)

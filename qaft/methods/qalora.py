"""QA-LoRA (Xu et al. 2023, https://arxiv.org/abs/2309.14717): group-pooled adapters that merge into offsets.

The base is quantized once by PTQ into integer codes with per-group ``s, b`` and frozen. ``A`` (r x in/g)
acts on the group-pooled input, ``pool(x)`` = the mean of each group of ``g`` input features::

    y = x Wq^T + alpha pool(x) A^T B^T

The adapter is constant inside each group, so it folds into the offsets:
``b'[o, k] = b[o, k] + (alpha / g) (B A)[o, k]``; codes and scales are unchanged and the merged integer layer
reproduces the training forward up to float rounding. (Mean pooling; with the official code's sum
variant the ``1/g`` leaves the merge.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qaft.methods.config import TRAIN, QuantLoRAMethodConfig, register
from qaft.methods.deploy import QuantizedLinear
from qaft.methods.layer import QaftLinear, add_lora, lora_delta, lora_output, recomputed_linear
from qaft.quant.affine import dequantize, quantize
from qaft.quant.init import init_scale_offset


class QALoRALinear(QaftLinear):
    PHASES = {TRAIN: frozenset({"lora_A", "lora_B"})}

    def __init__(self, linear: nn.Linear, config: "QALoRAConfig") -> None:
        super().__init__(linear, config)
        w = linear.weight.detach().float()
        scale, offset = init_scale_offset(w, config.bits, config.group_size, config.init, config.symmetric)
        self.register_buffer("codes", quantize(w, scale, offset, config.bits))
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.n_groups = scale.shape[1]
        add_lora(self, config.rank, self.n_groups, self.out_features)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(*x.shape[:-1], self.n_groups, -1).mean(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        y = recomputed_linear(x, dequantize, self.codes, self.scale, self.offset)
        y = y + lora_output(self.pool(x), self.lora_A, self.lora_B, c.scaling, c.dropout, self.training)
        return self._add_bias(y)

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        group_size = self.in_features // self.n_groups
        offset = self.offset + lora_delta(self, self.config.scaling) / group_size
        return QuantizedLinear(self.codes, self.scale, offset, self.config.bits, self.bias)


@register
@dataclass(kw_only=True)
class QALoRAConfig(QuantLoRAMethodConfig):
    name = "qalora"

    def make_layer(self, linear: nn.Linear) -> QALoRALinear:
        return QALoRALinear(linear, self)

"""QA-LoRA (Xu et al. 2023, https://arxiv.org/abs/2309.14717): group-pooled adapters that merge into offsets.

The base is quantized once by PTQ into integer codes with per-group ``s, b`` and frozen. ``A`` (r x in/g)
acts on the group-pooled input, ``pool(x)`` = the mean of each group of ``g`` input features::

    y = x Wq^T + alpha pool(x) A^T B^T

The adapter is constant inside each group, so it folds into the offsets:
``b'[o, k] = b[o, k] + (alpha / g) (B A)[o, k]``; codes and scales are unchanged and the merged integer layer
reproduces the training forward up to float rounding. (Mean pooling; with the official code's sum
variant the ``1/g`` leaves the merge.)

``zero_point="int"``: the base is quantized on the integer-zero grid (``b = s (2^(n-1) - z)``, 0 a level), and
training runs on it. The merge cannot keep that: adding ``(alpha / g) (B A)[o, k]`` to the offsets makes them
fractional multiples of the scale by design (it is how the adapter folds into an integer layer at all), so the
merged layer has float offsets whatever ``zero_point`` is. It stays exact: same codes, same scales.

``base_quant="gptq"``: GPTQ needs calibration data, so the float model is GPTQ-quantized first and each
QA-LoRA layer is built on the resulting codes with :meth:`QALoRALinear.from_quantized`
(:func:`qaft.methods.gptq_model.apply_method_calibrated` does both).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from qaft.methods.config import TRAIN, QuantLoRAMethodConfig, choice, register
from qaft.methods.layer import QaftLinear, add_lora, lora_delta, lora_output, recomputed_linear
from qaft.quant.affine import dequantize, quantize
from qaft.quant.init import init_scale_offset
from qaft.quant.linear import QuantizedLinear


class QALoRALinear(QaftLinear):
    PHASES = {TRAIN: frozenset({"lora_A", "lora_B"})}

    def __init__(self, linear: nn.Linear, config: "QALoRAConfig",
                 base: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
        super().__init__(linear, config)
        if base is None:
            w = linear.weight.detach().float()
            scale, offset = init_scale_offset(w, config.bits, config.group_size, config.init, config.symmetric,
                                              zero_point=config.zero_point)
            base = (quantize(w, scale, offset, config.bits), scale, offset)
        codes, scale, offset = base
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.n_groups = scale.shape[1]
        add_lora(self, config.rank, self.n_groups, self.out_features)

    @classmethod
    def from_quantized(cls, qlinear: QuantizedLinear, config: "QALoRAConfig") -> "QALoRALinear":
        """A QA-LoRA layer on an existing integer layer's codes, scales and offsets (e.g. from GPTQ)."""
        n_groups = 1 if config.group_size == -1 else qlinear.in_features // config.group_size
        if qlinear.bits != config.bits or qlinear.scale.shape[1] != n_groups:
            raise ValueError(f"QuantizedLinear ({qlinear.bits} bits, group {qlinear.group_size}) does not match "
                             f"the config ({config.bits} bits, group {config.group_size})")
        shape = SimpleNamespace(in_features=qlinear.in_features, out_features=qlinear.out_features, bias=qlinear.bias)
        return cls(shape, config, base=(qlinear.codes(), qlinear.scale.clone(), qlinear.offset.clone()))

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
    base_quant: str = "rtn"  # rtn | gptq (GPTQ: see qaft.methods.gptq_model.apply_method_calibrated)
    # zero_point (QuantFields) sets the base's grid; the merge moves the offsets off it (see the module doc).

    def validate(self) -> None:
        super().validate()
        choice("base_quant", self.base_quant, ("rtn", "gptq"))

    def make_layer(self, linear: nn.Linear) -> QALoRALinear:
        if self.base_quant == "gptq":
            raise ValueError("qalora with base_quant='gptq' needs calibration data: use "
                             "qaft.methods.gptq_model.apply_method_calibrated(model, config, batches)")
        return QALoRALinear(linear, self)

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

``base_quant="gptq"``: GPTQ needs calibration data, so the config says so (:meth:`QALoRAConfig.calibration_options`)
and ``qaft.apply_method(model, config, calib_batches=...)`` GPTQ-quantizes the float model first
(:func:`qaft.methods.gptq_model.gptq_quantize_model`) and builds each QA-LoRA layer on the resulting codes with
:meth:`QALoRALinear.from_quantized`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qaft.methods.config import (
    INTEGER,
    TRAIN,
    MethodTraits,
    QuantLoRAMethodConfig,
    register,
)
from qaft.methods.gptq_model import GPTQBaseFields
from qaft.methods.layer import QaftLinear, add_lora, lora_delta, lora_output, recomputed_linear
from qaft.quant.affine import dequantize
from qaft.quant.linear import QuantizedLinear, rtn_quantize


class QALoRALinear(QaftLinear):
    """Group-pooled LoRA over a frozen integer base ``(codes, scale, offset)``.

    Build it with :meth:`from_linear` (round-to-nearest base) or :meth:`from_quantized` (an existing integer
    layer's base, e.g. GPTQ's).
    """

    PHASES = {TRAIN: frozenset({"lora_A", "lora_B"})}
    STATE_BUFFERS = ("scale", "offset")

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None, config: QALoRAConfig,
                 base: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> None:
        super().__init__(in_features, out_features, bias, config)
        codes, scale, offset = base
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.n_groups = scale.shape[1]
        add_lora(self, config.rank, self.n_groups, self.out_features)

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: QALoRAConfig) -> QALoRALinear:
        """A QA-LoRA layer on the round-to-nearest base of a float layer (the config's quantizer settings)."""
        c = config
        base = rtn_quantize(linear.weight.detach().float(), c.bits, c.group_size, c.init, c.symmetric, c.zero_point)
        return cls(linear.in_features, linear.out_features, linear.bias, config, base)

    @classmethod
    def from_quantized(cls, qlinear: QuantizedLinear, config: QALoRAConfig) -> QALoRALinear:
        """A QA-LoRA layer on an existing integer layer's codes, scales and offsets (e.g. from GPTQ)."""
        n_groups = 1 if config.group_size == -1 else qlinear.in_features // config.group_size
        if qlinear.bits != config.bits or qlinear.scale.shape[1] != n_groups:
            raise ValueError(f"QuantizedLinear ({qlinear.bits} bits, group {qlinear.group_size}) does not match "
                             f"the config ({config.bits} bits, group {config.group_size})")
        base = (qlinear.codes(), qlinear.scale.clone(), qlinear.offset.clone())
        return cls(qlinear.in_features, qlinear.out_features, qlinear.bias, config, base)

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
class QALoRAConfig(GPTQBaseFields, QuantLoRAMethodConfig):
    """QA-LoRA; ``calib_batches``, ``act_order`` and ``percdamp`` apply with ``base_quant='gptq'``."""

    name = "qalora"
    # the offsets absorb B A to float rounding, off the integer-zero grid
    traits = MethodTraits(merges_to=INTEGER, starts_at_ptq=True, offsets_move=True)
    example_fields: ClassVar = {"group_size": 32}
    calibrated_fields: ClassVar = ({"base_quant": "gptq"},)
    rank: int = 64  # the paper's r (alpha 16)
    base_layer: ClassVar = QALoRALinear
    # zero_point (QuantFields) sets the base's grid; the merge moves the offsets off it (see the module doc).

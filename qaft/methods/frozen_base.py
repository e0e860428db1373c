"""LoRA outside a frozen quantized base: the layer of QLoRA (NF4 base), QAT-LoRA and LoftQ (NF4 or integer base).

``y = x deq(Q)^T + (alpha / r) x A^T B^T`` with the base ``Q`` frozen: NF4 (:class:`FrozenBaseLoRALinear`) or
integer codes with per-group scale/offset (:class:`IntBaseLoRALinear`, settings from the config's quantizer
fields). The base is dequantized on the fly in forward and again in backward, never kept. Merge:
``deq(Q) + (alpha / r) B A`` is a float model; deploying it at n bits needs a PTQ afterwards (the papers'
"QLoRA + PTQ" rows, :func:`qaft.ptq_model`).
"""
from __future__ import annotations

import torch
from torch import nn

from qaft.methods.config import TRAIN, LoRAFields
from qaft.methods.layer import QaftLinear, add_lora, float_linear, lora_delta, lora_output, recomputed_linear
from qaft.quant.affine import dequantize
from qaft.quant.linear import rtn_quantize
from qaft.quant.nf4 import NF4Tensor, nf4_dequantize, nf4_quantize


class FrozenBaseLoRALinear(QaftLinear):
    """LoRA outside a frozen NF4 base (QLoRA; LoftQ with ``base='nf4'``).

    ``base``: the float weight to quantize into the base instead of ``linear``'s (LoftQ's ``W - alpha B A``).
    """

    PHASES = {TRAIN: frozenset({"lora_A", "lora_B"})}

    def __init__(self, linear: nn.Linear, config: LoRAFields, base: torch.Tensor | None = None) -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, config)
        self.dtype = linear.weight.dtype
        weight = linear.weight.detach().float() if base is None else base
        self.store_base(weight)
        add_lora(self, config.rank, self.in_features, self.out_features)

    def store_base(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` into the frozen base (NF4 here; integer in :class:`IntBaseLoRALinear`)."""
        t = nf4_quantize(weight, double_quant=self.config.double_quant)
        for name, tensor in t.tensors().items():
            self.register_buffer(f"nf4_{name}", tensor)
        self._nf4_names = tuple(t.tensors())

    def base_state(self) -> tuple[torch.Tensor, ...]:
        return tuple(getattr(self, f"nf4_{n}") for n in self._nf4_names)

    def base_weight(self, *state: torch.Tensor) -> torch.Tensor:
        fields = dict(zip(self._nf4_names, state))
        t = NF4Tensor(fields["packed"], fields.get("absmax"), fields.get("absmax_codes"),
                      fields.get("absmax_scale"), fields.get("absmax_mean"),
                      torch.Size((self.out_features, self.in_features)))
        return nf4_dequantize(t)

    def dequantized_base(self) -> torch.Tensor:
        return self.base_weight(*self.base_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        y = recomputed_linear(x, self.base_weight, *self.base_state())
        return self._add_bias(y + lora_output(x, self.lora_A, self.lora_B, c.scaling, c.dropout, self.training))

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        merged = self.dequantized_base().add_(lora_delta(self, self.config.scaling))  # a fresh deq(Q), added to
        return float_linear(merged, self.bias, self.dtype)


class IntBaseLoRALinear(FrozenBaseLoRALinear):
    """LoRA outside a frozen integer base ``s * q + b`` (QAT-LoRA; LoftQ with ``base='int'``).

    ``zero_point="int"`` puts the base on the integer-zero grid; the float merge cannot keep it (the PTQ that
    deploys the merged model has its own ``zero_point``).
    """

    STATE_BUFFERS = ("scale", "offset")

    def store_base(self, weight: torch.Tensor) -> None:
        c = self.config
        codes, scale, offset = rtn_quantize(weight, c.bits, c.group_size, c.init, c.symmetric, c.zero_point)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)

    def base_state(self) -> tuple[torch.Tensor, ...]:
        return self.codes, self.scale, self.offset

    def base_weight(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
        return dequantize(codes, scale, offset)

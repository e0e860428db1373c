"""LLM-QAT (Liu et al. 2023, https://arxiv.org/abs/2305.17888): full QAT, logit distillation from the float model.

**Weights.** Every target ``W`` trains. Its quantizer has nothing to learn: symmetric min-max per output channel
(per group with ``group_size > 0``), recomputed from the current ``W`` at every forward::

    s  = max|W_g| / (2^(n-1) - 1)        # per row g, detached: no gradient flows through s
    Wq = s * round(W / s)                # codes in [-(2^(n-1) - 1), 2^(n-1) - 1]
    dWq/dW = 1                           # straight through (nothing is clipped: |W / s| <= 2^(n-1) - 1)

This is the public code's ``SymQuantizer`` for weights of 3 bits and more; at 2 bits the grid is ternary
``{-s, 0, s}`` (the public code has another 2-bit scheme, not implemented here). Training computes ``Wq`` with
:func:`~qaft.quant.affine.quantize` / :func:`~qaft.quant.affine.dequantize` at offset 0, the functions the merge
stores and the deployed :class:`~qaft.quant.linear.QuantizedLinear` reads back, so merged == trained bit for bit.
Activations and the KV cache: the shared per-token quantizers (``act_bits``, ``kv_bits``; :mod:`qaft.methods.act_kv`).

**Loss.** Cross-entropy against the frozen float teacher's full next-token distribution
(:mod:`qaft.methods.distill`), on sequences the float model generated itself (:mod:`qaft.data.generated`) or on
real text. The teacher's logits are computed in the same step by the same model under :meth:`LLMQATConfig.teacher`:
each LLM-QAT layer then computes with ``teacher_weight`` (its original weight, ``F.linear`` exactly as the replaced
``nn.Linear``), the activation / KV quantizers pass their input through, and dropout is off.

**Memory bound of the teacher.** No second model: embeddings, norms and ``lm_head`` are frozen (as in every qaft
method) and serve student and teacher alike. On top of full QAT the teacher costs one copy of each target linear's
original weight, in the model's dtype (a non-persistent buffer: not in checkpoints, rebuilt from the base model
whenever the method is applied, so a resume rebuilds the same teacher), plus one batch of teacher logits
(``B x T x vocab``) during the step; the teacher's activations are not kept (no graph).
The public code instead trains every parameter (embeddings, norms and ``lm_head`` too) beside a second full
teacher model; keeping them frozen is what lets the student's own copies serve the teacher.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.act_kv import float_activations
from qaft.methods.config import INTEGER, TRAIN, MethodConfig, MethodTraits, register
from qaft.methods.layer import QaftLinear
from qaft.quant.affine import check_bits, dequantize, quantize
from qaft.quant.granularity import granularity, grouped
from qaft.quant.init import MIN_SCALE
from qaft.quant.linear import QuantizedLinear


def absmax_scale(w: torch.Tensor, bits: int, n_groups: int) -> torch.Tensor:
    """``s = max|W_g| / (2^(n-1) - 1)`` per group, shape ``(out, n_groups)``, in float32 (float64 for a float64
    ``w``), detached; at least :data:`~qaft.quant.init.MIN_SCALE` (an all-zero group keeps code 0)."""
    wide = w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32)
    return (grouped(wide, n_groups).abs().amax(-1) / (2 ** (check_bits(bits) - 1) - 1)).clamp_min(MIN_SCALE)


class _AbsmaxSTE(torch.autograd.Function):
    """``dequantize(quantize(W, s, 0), s, 0)`` forward (the merge's functions), identity backward."""

    @staticmethod
    def forward(ctx, w, scale, bits):
        zero = torch.zeros_like(scale)
        return dequantize(quantize(w, scale, zero, bits), scale, zero).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class LLMQATLinear(QaftLinear):
    """``y = x Q(W)^T + bias`` with ``Q`` the per-forward symmetric min-max quantizer; ``W`` trains."""

    PHASES = {TRAIN: frozenset({"weight"})}

    def __init__(self, linear: nn.Linear, config: "LLMQATConfig") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, config)
        self.weight = nn.Parameter(linear.weight.detach().float().clone())
        # The teacher's weight, bit for bit the replaced layer's (same dtype); rebuilt, never saved.
        self.register_buffer("teacher_weight", linear.weight.detach().clone(), persistent=False)
        self.n_groups = linear.in_features // granularity(config.group_size).group_size(linear.in_features)
        self.teaching = False

    def scale(self) -> torch.Tensor:
        """The current per-group scale ``(out, n_groups)``, from the current weight."""
        return absmax_scale(self.weight, self.config.bits, self.n_groups)

    def quantized_weight(self) -> torch.Tensor:
        """``Q(W)`` in float32, straight-through to ``W``."""
        return _AbsmaxSTE.apply(self.weight, self.scale(), self.config.bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.teaching:
            return F.linear(x, self.teacher_weight, self.bias)
        # F.linear with the bias, as QuantizedLinear computes it: the merged layer reproduces this exactly
        return F.linear(x, self.quantized_weight().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        scale = self.scale()
        zero = torch.zeros_like(scale)
        return QuantizedLinear(quantize(self.weight, scale, zero, self.config.bits), scale, zero, self.config.bits,
                               self.bias)


@contextmanager
def teacher_forward(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` computes the float model it was built from: every :class:`LLMQATLinear` uses its
    original weight, activation / KV quantizers pass through, every module is in eval mode (no dropout). On exit
    the student is back, modes included."""
    layers = [m for m in model.modules() if isinstance(m, LLMQATLinear)]
    modes = [(m, m.training) for m in model.modules()]
    with float_activations(model):
        for layer in layers:
            layer.teaching = True
        model.eval()
        try:
            yield
        finally:
            for layer in layers:
                layer.teaching = False
            for module, training in modes:
                module.training = training


@register
@dataclass(kw_only=True)
class LLMQATConfig(MethodConfig):
    """LLM-QAT: ``bits`` of the weights; ``group_size`` -1 (per output channel: the method's) or a group width.
    The weight quantizer has no other setting (always symmetric min-max, recomputed every step)."""

    name = "llm_qat"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True, trains_weights=True, symmetric_grid=True)
    example_fields: ClassVar = {}  # per output channel, the method's own
    bits: int = 4
    group_size: int = -1

    def validate(self) -> None:
        check_bits(self.bits)
        granularity(self.group_size)

    def validate_layer(self, module_name: str, linear: nn.Linear) -> None:
        try:
            granularity(self.group_size).group_size(linear.in_features)
        except ValueError as err:
            raise ValueError(f"{module_name}: {err}") from None

    def make_layer(self, linear: nn.Linear) -> LLMQATLinear:
        return LLMQATLinear(linear, self)

    def teacher(self, model: nn.Module) -> AbstractContextManager[None]:
        return teacher_forward(model)


__all__ = ["LLMQATConfig", "LLMQATLinear", "absmax_scale", "teacher_forward"]

"""What every method layer shares: the frozen base, the LoRA factors, phases and parameter roles.

A method layer replaces one ``nn.Linear``. It keeps the original bias frozen, declares which of its
parameters train in which phase (``PHASES``), and ``merge()`` returns the deployable layer.
"""
from __future__ import annotations

import math
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# Role of each parameter name, for optimizer parameter groups (lr / weight decay per role).
# ``zero``: the integer zero point z of the integer-zero grid (zero_point="int"), trained in place of ``offset``.
ROLES = {"lora_A": "lora", "lora_B": "lora", "scale": "quant", "offset": "quant", "zero": "quant",
         "magnitude": "quant", "weight": "weight"}


class QaftLinear(nn.Module):
    """Base of every method layer: frozen bias, phases, roles, and a ``merge()`` to deploy."""

    # phase name -> names of the parameters that train in it
    PHASES: ClassVar[dict[str, frozenset[str]]] = {}

    def __init__(self, linear: nn.Linear, config) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.config = config
        bias = linear.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.phase = ""

    def set_phase(self, phase: str) -> None:
        """Make exactly the parameters of ``phase`` trainable."""
        trainable = self.PHASES[phase]
        for name, param in self.named_parameters(recurse=False):
            param.requires_grad_(name in trainable)
        self.phase = phase

    def role_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Every parameter that trains in some phase, by role (``lora``, ``quant``, ``weight``)."""
        ever = frozenset().union(*self.PHASES.values())
        groups: dict[str, list[nn.Parameter]] = {}
        for name, param in self.named_parameters(recurse=False):
            if name in ever:
                groups.setdefault(ROLES[name], []).append(param)
        return groups

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def merge(self) -> nn.Module:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, phase={self.phase!r}"


def add_lora(layer: nn.Module, rank: int, in_features: int, out_features: int, gaussian: bool = False) -> None:
    """Create ``lora_A`` (rank x in) and ``lora_B = 0`` (out x rank) on ``layer``, in float32.

    ``A`` is Kaiming-uniform as in LoRA/peft, or Gaussian with std 1/rank (DL-QAT).
    """
    a = torch.empty(rank, in_features)
    if gaussian:
        nn.init.normal_(a, std=1.0 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    layer.lora_A = nn.Parameter(a)
    layer.lora_B = nn.Parameter(torch.zeros(out_features, rank))


def lora_delta(layer: nn.Module, scaling: float) -> torch.Tensor:
    """``scaling * B A`` in float32."""
    return scaling * (layer.lora_B @ layer.lora_A)


def lora_output(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float,
                training: bool) -> torch.Tensor:
    """``scaling * dropout(x) A^T B^T``, computed in the adapter's dtype, returned in ``x``'s."""
    h = F.dropout(x, dropout, training) if dropout > 0 else x
    return (scaling * (h.to(a.dtype) @ a.T @ b.T)).to(x.dtype)


class _RecomputedLinear(torch.autograd.Function):
    """``x W^T`` for a frozen ``W = weight_fn(*state)`` that is rebuilt in backward instead of saved.

    The base of QLoRA / QA-LoRA / QAT-LoRA is stored compressed; keeping its dequantized copy alive
    until backward would cost one weight-sized tensor per layer, which is what this avoids.
    """

    @staticmethod
    def forward(ctx, x, weight_fn, *state):
        ctx.weight_fn = weight_fn
        ctx.save_for_backward(*state)
        return x @ weight_fn(*state).to(x.dtype).T

    @staticmethod
    def backward(ctx, grad):
        w = ctx.weight_fn(*ctx.saved_tensors)
        return (grad @ w.to(grad.dtype), None) + (None,) * len(ctx.saved_tensors)


def recomputed_linear(x: torch.Tensor, weight_fn: Callable[..., torch.Tensor], *state: torch.Tensor) -> torch.Tensor:
    return _RecomputedLinear.apply(x, weight_fn, *state)


def float_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A plain ``nn.Linear`` holding ``weight`` (the deployable form of float-merged methods)."""
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device=weight.device, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.requires_grad_(False)
    return layer

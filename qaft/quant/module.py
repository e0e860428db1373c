"""A thin module that holds one layer's quantizer state: per-group scale ``s`` and offset ``b`` (or zero ``z``).

On the integer-zero grid (``zero_point="int"``) the trained state is ``s`` and a float ``z`` (parameter
``zero``); the offset is derived each step, ``b = s (2^(n-1) - round(z))`` with ``round(z)`` clamped to
``[0, 2^n - 1]`` and a straight-through gradient (:func:`qaft.quant.affine.offset_of_zero`), so it stays an
integer multiple of ``s`` and 0 stays a level. A symmetric quantizer (``b = 0``, i.e. ``z = 2^(n-1)``) keeps its
zero offset buffer on either grid.
"""
from __future__ import annotations

import torch
from torch import nn

from qaft.quant.affine import check_bits, fake_quantize, lsq_grad_scale, offset_of_zero, quantize
from qaft.quant.init import Init, ZeroPoint, init_scale_offset, init_scale_zero, parse_zero_point


def learns_zero(symmetric: bool, zero_point: str | ZeroPoint) -> bool:
    """Whether the quantizer state is ``(scale, zero)`` rather than ``(scale, offset)``."""
    return parse_zero_point(zero_point) is ZeroPoint.INT and not symmetric


def register_scale_offset(module: nn.Module, weight: torch.Tensor, bits: int, group_size: int,
                          init: str | Init = Init.MINMAX, symmetric: bool = False,
                          zero_point: str | ZeroPoint = ZeroPoint.FLOAT) -> None:
    """Give ``module`` a ``scale`` parameter and an ``offset`` parameter (a zero buffer if symmetric), or with
    ``zero_point="int"`` a ``zero`` parameter instead of the offset, initialised per group from ``weight``;
    method layers and :class:`AffineQuantizer` share this. Read the offset with :func:`current_offset`."""
    if learns_zero(symmetric, zero_point):
        scale, zero = init_scale_zero(weight, bits, group_size, init, symmetric)
        module.scale = nn.Parameter(scale)
        module.zero = nn.Parameter(zero)
        return
    scale, offset = init_scale_offset(weight, bits, group_size, init, symmetric)
    module.scale = nn.Parameter(scale)
    if symmetric:
        module.register_buffer("offset", offset)
    else:
        module.offset = nn.Parameter(offset)


def current_offset(module: nn.Module, bits: int) -> torch.Tensor:
    """The offset ``b`` of a module set up by :func:`register_scale_offset` (derived from ``zero`` if it has one)."""
    zero = getattr(module, "zero", None)
    return module.offset if zero is None else offset_of_zero(module.scale, zero, bits)


class AffineQuantizer(nn.Module):
    """Holds ``scale`` and ``offset`` (or ``zero``), (out, n_groups), as parameters; ``forward(w)`` fake-quantizes
    ``w``.

    With ``symmetric=True`` the offset is a zero buffer that never trains.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int,
        init: str | Init = Init.MINMAX,
        symmetric: bool = False,
        use_grad_scale: bool = False,
        zero_point: str | ZeroPoint = ZeroPoint.FLOAT,
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        register_scale_offset(self, weight, bits, group_size, init, symmetric, zero_point)
        self.group_numel = weight.shape[1] // self.scale.shape[1]
        self.use_grad_scale = use_grad_scale

    @property
    def grad_scale(self) -> float:
        return lsq_grad_scale(self.group_numel, self.bits) if self.use_grad_scale else 1.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale, current_offset(self, self.bits), self.bits, self.grad_scale)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return quantize(w, self.scale.detach(), current_offset(self, self.bits).detach(), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={tuple(self.scale.shape)}, grad_scale={self.use_grad_scale}"

"""The trainable quantizer of one layer: per-group scale ``s`` and offset ``b`` (or integer zero ``z``).

Every method layer that trains its quantizer (L4Q, DL-QAT, full QAT) holds one :class:`AffineQuantizer` as its
submodule ``quantizer``, so its state is ``<layer>.quantizer.scale`` and ``<layer>.quantizer.offset`` (or
``.zero``). Layers whose integer base is frozen (QA-LoRA, QAT-LoRA) keep plain buffers: nothing of theirs trains.

On the integer-zero grid (``zero_point="int"``) the trained state is ``s`` and a float ``z`` (parameter
``zero``); the offset is derived each step, ``b = s (2^(n-1) - round(z))`` with ``round(z)`` clamped to
``[0, 2^n - 1]`` and a straight-through gradient (:func:`qaft.quant.affine.offset_of_zero`), so it stays an
integer multiple of ``s`` and 0 stays a level. A symmetric quantizer (``b = 0``, i.e. ``z = 2^(n-1)``) keeps its
zero offset as a buffer on either grid.
"""
from __future__ import annotations

import torch
from torch import nn

from qaft.quant.affine import check_bits, fake_quantize, lsq_grad_scale, offset_of_zero, quantize
from qaft.quant.init import Init, ZeroPoint, init_scale_offset, init_scale_zero, parse_zero_point


def learns_zero(symmetric: bool, zero_point: str | ZeroPoint) -> bool:
    """Whether the quantizer state is ``(scale, zero)`` rather than ``(scale, offset)``."""
    return parse_zero_point(zero_point) is ZeroPoint.INT and not symmetric


class AffineQuantizer(nn.Module):
    """``scale`` and ``offset`` (or ``zero``), (out, n_groups), initialised per group from a weight.

    ``forward(w)`` fake-quantizes ``w`` with LSQ+ gradients. With ``symmetric=True`` the offset is a zero buffer
    that never trains; with ``zero_point="int"`` (and not symmetric) a parameter ``zero`` replaces ``offset``.
    Read ``b`` with :meth:`current_offset`, which derives it from ``zero`` where there is one.
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
        self.learns_zero = learns_zero(symmetric, zero_point)
        if self.learns_zero:
            scale, zero = init_scale_zero(weight, bits, group_size, init, symmetric)
            self.scale = nn.Parameter(scale)
            self.zero = nn.Parameter(zero)
        else:
            scale, offset = init_scale_offset(weight, bits, group_size, init, symmetric)
            self.scale = nn.Parameter(scale)
            if symmetric:
                self.register_buffer("offset", offset)
            else:
                self.offset = nn.Parameter(offset)
        self.group_numel = weight.shape[1] // scale.shape[1]
        self.use_grad_scale = use_grad_scale

    @property
    def grad_scale(self) -> float:
        """LSQ's gradient scale on ``s`` and ``b`` where enabled, else 1."""
        return lsq_grad_scale(self.group_numel, self.bits) if self.use_grad_scale else 1.0

    def current_offset(self) -> torch.Tensor:
        """The offset ``b``: the ``offset`` tensor, or ``s (2^(n-1) - round(z))`` from ``zero``."""
        return self.offset_of(self.scale, self.zero) if self.learns_zero else self.offset

    def offset_of(self, scale: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """The offset of a fit ``(scale, state)`` on this quantizer's grid (``state``: an offset, or a zero)."""
        return offset_of_zero(scale, state, self.bits) if self.learns_zero else state

    @torch.no_grad()
    def assign(self, scale: torch.Tensor, state: torch.Tensor) -> None:
        """Overwrite the state with a fit ``(scale, offset)``, or ``(scale, zero)`` on the integer-zero grid."""
        self.scale.copy_(scale)
        (self.zero if self.learns_zero else self.offset).copy_(state)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale, self.current_offset(), self.bits, self.grad_scale)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return quantize(w, self.scale.detach(), self.current_offset().detach(), self.bits)

    def extra_repr(self) -> str:
        return (f"bits={self.bits}, groups={tuple(self.scale.shape)}, grad_scale={self.use_grad_scale}, "
                f"learns_zero={self.learns_zero}")

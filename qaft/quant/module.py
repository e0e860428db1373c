"""A thin module that holds one layer's quantizer state: per-group scale ``s`` and offset ``b``."""
from __future__ import annotations

import torch
from torch import nn

from qaft.quant.affine import check_bits, fake_quantize, lsq_grad_scale, quantize
from qaft.quant.init import Init, init_scale_offset


def register_scale_offset(module: nn.Module, weight: torch.Tensor, bits: int, group_size: int,
                          init: str | Init = Init.MINMAX, symmetric: bool = False) -> None:
    """Give ``module`` a ``scale`` parameter and an ``offset`` parameter (a zero buffer if symmetric),
    initialised per group from ``weight``; method layers and :class:`AffineQuantizer` share this."""
    scale, offset = init_scale_offset(weight, bits, group_size, init, symmetric)
    module.scale = nn.Parameter(scale)
    if symmetric:
        module.register_buffer("offset", offset)
    else:
        module.offset = nn.Parameter(offset)


class AffineQuantizer(nn.Module):
    """Holds ``scale`` and ``offset`` (out, n_groups) as parameters; ``forward(w)`` fake-quantizes ``w``.

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
    ) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        register_scale_offset(self, weight, bits, group_size, init, symmetric)
        self.group_numel = weight.shape[1] // self.scale.shape[1]
        self.use_grad_scale = use_grad_scale

    @property
    def grad_scale(self) -> float:
        return lsq_grad_scale(self.group_numel, self.bits) if self.use_grad_scale else 1.0

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return fake_quantize(w, self.scale, self.offset, self.bits, self.grad_scale)

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        return quantize(w, self.scale.detach(), self.offset.detach(), self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, groups={tuple(self.scale.shape)}, grad_scale={self.use_grad_scale}"

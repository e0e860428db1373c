"""The deployable integer layer: packed unsigned codes plus per-group float scale and offset.

``W = s * (u - 2^(n-1)) + b`` per group: for 4 bits exactly the layout of PyTorch's int4 kernels
(scale and float zero per group). This reference forward dequantizes; kernels come with deployment.
An integer-zero layer (``zero_point="int"``) is the special case ``b = s (2^(n-1) - z)``: the same storage.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qaft.quant.affine import check_bits, dequantize, quantize
from qaft.quant.init import init_scale_offset
from qaft.quant.packing import pack_codes, unpack_codes


class QuantizedLinear(nn.Module):
    """Integer weights (``bits`` each, packed) with per-group ``scale`` and ``offset`` (out, n_groups)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.out_features, self.in_features = codes.shape
        # u = q + 2^(n-1) lies in [0, 2^n - 1]: adding in uint8 (mod 256) is exact, with no wider temporary
        unsigned = codes.to(torch.uint8).add_(2 ** (bits - 1))
        self.register_buffer("qweight", pack_codes(unsigned, bits))
        self.register_buffer("scale", scale.detach().float().contiguous())
        self.register_buffer("offset", offset.detach().float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def group_size(self) -> int:
        return self.in_features // self.scale.shape[1]

    def codes(self) -> torch.Tensor:
        """Signed codes (int8, out x in)."""
        u = unpack_codes(self.qweight, self.bits, self.in_features)
        return (u.to(torch.int16) - 2 ** (self.bits - 1)).to(torch.int8)

    def dequantize_weight(self) -> torch.Tensor:
        return dequantize(self.codes(), self.scale, self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.dequantize_weight().to(x.dtype)
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def merge(self) -> "QuantizedLinear":
        return self

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


def rtn_quantize(w: torch.Tensor, bits: int, group_size: int, init: str = "minmax", symmetric: bool = False,
                 zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``(codes, scale, offset)`` of ``w``: the frozen integer base of PTQ, QA-LoRA, QAT-LoRA
    and LoftQ (``zero_point="int"``: on the integer-zero grid)."""
    scale, offset = init_scale_offset(w, bits, group_size, init, symmetric, zero_point=zero_point)
    return quantize(w, scale, offset, bits), scale, offset


def rtn_quantize_linear(linear: nn.Module, bits: int, group_size: int, init: str = "minmax",
                        symmetric: bool = False, zero_point: str = "float") -> QuantizedLinear:
    """Round-to-nearest PTQ of a float linear layer."""
    codes, scale, offset = rtn_quantize(linear.weight.detach().float(), bits, group_size, init, symmetric, zero_point)
    return QuantizedLinear(codes, scale, offset, bits, linear.bias)

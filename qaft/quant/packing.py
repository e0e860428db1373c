"""Bit packing of unsigned integer codes (2, 3, 4 or 8 bits) along the last dimension.

Every 8 consecutive codes form one big-endian bit string of ``8 * bits`` bits, stored as ``bits`` bytes:
code ``j`` of the 8 sits at bit offset ``bits * (7 - j)``. For 4 bits this is two codes per byte with the
even column in the high nibble, which is the input layout of PyTorch's int4 "tinygemm" conversion
(``_convert_weight_to_int4pack``); :func:`to_int4pack_cpu` converts to the CPU kernel's layout.
"""
from __future__ import annotations

import torch

from qaft.quant.affine import check_bits


def packed_length(k: int, bits: int) -> int:
    """Bytes per row of ``k`` codes: 8-bit codes are stored as they are, narrower ones in padded octets."""
    return k if bits == 8 else (k + 7) // 8 * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (values < 2**bits) of shape (..., k) into uint8 (..., ceil(k/8) * bits)."""
    check_bits(bits)
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    k = codes.shape[-1]
    padded = torch.nn.functional.pad(codes.to(torch.uint8), (0, (-k) % 8))
    if 8 % bits == 0:
        # 2 and 4 bits: whole codes per byte, the first in the high bits; uint8 throughout, so packing a layer
        # costs about its codes in temporaries (a merge packs every layer of a model)
        per_byte = padded.view(*codes.shape[:-1], padded.shape[-1] * bits // 8, 8 // bits)
        packed = per_byte[..., 0] << (8 - bits)
        for j in range(1, 8 // bits):
            packed |= per_byte[..., j] << (8 - bits * (j + 1))
        return packed
    # 3 bits: the 24-bit word of each octet fits an int32
    octets = padded.view(*codes.shape[:-1], padded.shape[-1] // 8, 8).to(torch.int32)
    shifts = bits * torch.arange(7, -1, -1, device=codes.device, dtype=torch.int32)
    word = (octets << shifts).sum(-1, keepdim=True, dtype=torch.int32)
    byte_shifts = 8 * torch.arange(bits - 1, -1, -1, device=codes.device, dtype=torch.int32)
    packed = (word >> byte_shifts) & 0xFF
    return packed.to(torch.uint8).reshape(*codes.shape[:-1], padded.shape[-1] * bits // 8)


def unpack_codes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes of shape (..., k)."""
    check_bits(bits)
    if bits == 8:
        return packed[..., :k]
    if 8 % bits == 0:
        # 2 and 4 bits: codes never straddle a byte, so plain uint8 shifts suffice (no int64 temporaries).
        shifts = torch.arange(8 - bits, -1, -bits, device=packed.device, dtype=torch.uint8)
        codes = (packed.unsqueeze(-1) >> shifts) & (2**bits - 1)
        return codes.reshape(*packed.shape[:-1], -1)[..., :k]
    groups = packed.to(torch.int64).view(*packed.shape[:-1], -1, bits)
    byte_shifts = 8 * torch.arange(bits - 1, -1, -1, device=packed.device)
    word = (groups << byte_shifts).sum(-1, keepdim=True)
    shifts = bits * torch.arange(7, -1, -1, device=packed.device)
    codes = (word >> shifts) & (2**bits - 1)
    return codes.to(torch.uint8).reshape(*packed.shape[:-1], -1)[..., :k]


def to_int4pack_cpu(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """Convert 4-bit packed codes (out, in/2) to the layout of ``torch.ops.aten._weight_int4pack_mm_for_cpu``."""
    codes = unpack_codes(packed, 4, in_features).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)

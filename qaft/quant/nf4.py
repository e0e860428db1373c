"""NF4, QLoRA's 4-bit NormalFloat storage (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

Values are cut row-major into blocks of 64; each block stores its absmax ``c`` and every value ``w`` maps
to the nearest of 16 normal-quantile levels of ``w / c``. Double quantization stores the absmax constants,
minus their mean, as 8-bit codes with one float32 absmax per block of 256 (symmetric linear int8 here;
bitsandbytes uses its dynamic 8-bit map instead, so double-quantized constants differ from its in the
last bits). NF4 has no integer kernel: it is a storage format for a frozen base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qaft.quant.packing import pack_codes, unpack_codes

NF4_CODE = torch.tensor(
    [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
     0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
)
NF4_BLOCK = 64
DQ_BLOCK = 256


@dataclass
class NF4Tensor:
    """Packed NF4 codes plus absmax constants (plain or double quantized)."""

    packed: torch.Tensor  # uint8, two codes per byte
    absmax: torch.Tensor | None  # float32 per block, when not double quantized
    absmax_codes: torch.Tensor | None  # int8 per block, when double quantized
    absmax_scale: torch.Tensor | None  # float32 per DQ block
    absmax_mean: torch.Tensor | None  # float32 scalar
    shape: torch.Size
    blocksize: int = NF4_BLOCK

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_mean")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    pad = (-flat.numel()) % blocksize
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, blocksize)


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = absmax.mean()
    blocks = _blocks(absmax - mean, DQ_BLOCK)
    scale = blocks.abs().amax(-1).clamp_min(1e-12) / 127
    codes = (blocks / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
    return codes.flatten()[: absmax.numel()], scale, mean


def _absmax_of(t: NF4Tensor) -> torch.Tensor:
    if t.absmax is not None:
        return t.absmax
    blocks = _blocks(t.absmax_codes.float(), DQ_BLOCK) * t.absmax_scale[:, None]
    return blocks.flatten()[: t.absmax_codes.numel()] + t.absmax_mean


def nf4_quantize(w: torch.Tensor, blocksize: int = NF4_BLOCK, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``w`` (any shape) to NF4 with per-block absmax."""
    blocks = _blocks(w.detach().float().flatten(), blocksize)
    absmax = blocks.abs().amax(-1)
    normed = blocks / torch.where(absmax > 0, absmax, 1.0)[:, None]
    # Nearest level via midpoints between neighbouring codebook entries.
    mids = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2
    codes = torch.bucketize(normed, mids.to(normed.device)).to(torch.uint8)
    packed = pack_codes(codes.flatten()[: w.numel()], 4)
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, None, w.shape, blocksize)
    codes8, scale, mean = _double_quantize(absmax)
    return NF4Tensor(packed, None, codes8, scale, mean, w.shape, blocksize)


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor an :class:`NF4Tensor` stands for."""
    numel = t.shape.numel()
    codes = unpack_codes(t.packed, 4, numel).long()
    values = _blocks(NF4_CODE.to(t.packed.device)[codes], t.blocksize) * _absmax_of(t)[:, None]
    return values.flatten()[:numel].view(t.shape).to(dtype)

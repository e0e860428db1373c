"""NF4, QLoRA's 4-bit NormalFloat storage (Dettmers et al. 2023, https://arxiv.org/abs/2305.14314).

Values are cut row-major into blocks of 64; each block stores its absmax ``c`` and every value ``w`` maps
to the nearest of 16 normal-quantile levels of ``w * (1/c)`` (ties to the lower level).

Double quantization (QLoRA section 3) stores the constants ``c`` in 8 bits, as bitsandbytes does:
``m = mean(c)``; ``c - m`` is cut into blocks of 256, each with a float32 absmax ``s``; each entry keeps the
uint8 index of the nearest value of ``(c - m) * (1/s)`` in the signed *dynamic* 8-bit map of Dettmers,
"8-bit Optimizers via Block-wise Quantization" (https://arxiv.org/abs/2110.02861): for ``k = 0..6``, the
``2**k`` midpoints of ``linspace(0.1, 1, 2**k + 1)`` times ``10**(k - 6)``, with both signs, plus 0 and 1
(bitsandbytes' ``create_dynamic_map(signed=True)``). A value exactly halfway between two map entries
takes the even index, as bitsandbytes' CUDA kernel does. Then ``c' = map[index] * s + m``. (bitsandbytes'
native CPU kernel reads the index from a 65536-entry table over [-1, 1] instead, not always the nearest.)
NF4 has no integer kernel: it is a storage format for a frozen base.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from qaft.quant.packing import pack_codes, unpack_codes

# The float32 NF4 levels (QLoRA appendix E; the same floats as bitsandbytes' NF4 table).
NF4_CODE = torch.tensor(
    [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
     -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
     0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0],
    dtype=torch.float32,
)
NF4_BLOCK = 64
DQ_BLOCK = 256
DYNAMIC_EXPONENTS = 7  # decades 10**-6 .. 10**0 of the signed dynamic 8-bit map


def dynamic_map() -> torch.Tensor:
    """The signed dynamic tree 8-bit map: 256 sorted float32 values in [-0.993, 1]."""
    values = [torch.zeros(1, dtype=torch.float32), torch.ones(1, dtype=torch.float32)]
    for k in range(DYNAMIC_EXPONENTS):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2
        decade = 10.0 ** (k - DYNAMIC_EXPONENTS + 1)
        values += [mids * decade, mids * -decade]
    return torch.cat(values).sort().values


DYNAMIC_MAP = dynamic_map()


def nearest_index(x: torch.Tensor, levels: torch.Tensor, ties_to_even: bool) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` for each ``x``, decided at float32 midpoints.

    A value exactly on a midpoint takes the lower index, or with ``ties_to_even`` the even one of the two.
    """
    mids = (levels[:-1] + levels[1:]) / 2
    idx = torch.bucketize(x, mids)
    if ties_to_even:
        on_mid = x == mids[idx.clamp(max=mids.numel() - 1)]
        idx = idx + (on_mid & (idx % 2 == 1)).long()
    return idx


@dataclass
class NF4Tensor:
    """Packed NF4 codes plus absmax constants (plain or double quantized)."""

    packed: torch.Tensor  # uint8, two codes per byte
    absmax: torch.Tensor | None  # float32 per block, when not double quantized
    absmax_codes: torch.Tensor | None  # uint8 per block, indices into DYNAMIC_MAP, when double quantized
    absmax_scale: torch.Tensor | None  # float32 absmax of (absmax - mean) per DQ block of 256 constants
    absmax_mean: torch.Tensor | None  # float32 scalar, the mean of the absmax constants
    shape: torch.Size
    blocksize: int = NF4_BLOCK

    def tensors(self) -> dict[str, torch.Tensor]:
        names = ("packed", "absmax", "absmax_codes", "absmax_scale", "absmax_mean")
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}


def _blocks(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``flat`` as rows of ``blocksize``, zero-padded at the end; a view of ``flat`` when no padding is needed."""
    pad = (-flat.numel()) % blocksize
    return (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, blocksize)


def _normalize(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row absmax and the rows times its reciprocal (an all-zero row stays zero)."""
    absmax = blocks.abs().amax(-1)
    return absmax, blocks * (1.0 / torch.where(absmax > 0, absmax, 1.0))[:, None]


def _double_quantize(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mean = absmax.mean()
    scale, normed = _normalize(_blocks(absmax - mean, DQ_BLOCK))
    codes = nearest_index(normed, DYNAMIC_MAP.to(normed.device), ties_to_even=True).to(torch.uint8)
    return codes.flatten()[: absmax.numel()], scale, mean


def _absmax_of(t: NF4Tensor) -> torch.Tensor:
    if t.absmax is not None:
        return t.absmax
    if t.absmax_codes.dtype != torch.uint8:
        raise ValueError(f"absmax_codes must be uint8 indices into the dynamic map, got {t.absmax_codes.dtype} "
                         "(qaft's earlier linear int8 double quantization is not readable any more)")
    levels = DYNAMIC_MAP.to(t.absmax_codes.device)[t.absmax_codes.long()]
    blocks = _blocks(levels, DQ_BLOCK) * t.absmax_scale[:, None]
    return blocks.flatten()[: t.absmax_codes.numel()] + t.absmax_mean


def nf4_quantize(w: torch.Tensor, blocksize: int = NF4_BLOCK, double_quant: bool = False) -> NF4Tensor:
    """Quantize ``w`` (any shape) to NF4 with per-block absmax, optionally double quantized."""
    absmax, normed = _normalize(_blocks(w.detach().float().flatten(), blocksize))
    codes = nearest_index(normed, NF4_CODE.to(normed.device), ties_to_even=False).to(torch.uint8)
    packed = pack_codes(codes.flatten()[: w.numel()], 4)
    if not double_quant:
        return NF4Tensor(packed, absmax, None, None, None, w.shape, blocksize)
    codes8, scale, mean = _double_quantize(absmax)
    return NF4Tensor(packed, None, codes8, scale, mean, w.shape, blocksize)


def nf4_dequantize(t: NF4Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float tensor an :class:`NF4Tensor` stands for."""
    numel = t.shape.numel()
    codes = unpack_codes(t.packed, 4, numel).int()  # int32 indices: half the temporary of int64 ones
    values = _blocks(NF4_CODE.to(t.packed.device)[codes], t.blocksize).mul_(_absmax_of(t)[:, None])
    return values.flatten()[:numel].view(t.shape).to(dtype)

"""The activation and KV-cache quantizer: dynamic, symmetric, per token (LLM-QAT's, Liu et al. 2023,
https://arxiv.org/abs/2305.17888).

For each vector ``x`` along the last dimension (one token: a linear's input row, or one token's K or V over all
heads) and ``n`` bits, with ``Q = 2^(n-1) - 1``::

    s   = max|x| / Q             # a new scale per token at every call: nothing is learned or calibrated
    q   = round(x / s)           # codes in [-Q, Q] (symmetric: -2^(n-1) is never used)
    x_q = s * q

An all-zero vector has ``s = 0`` and stays zero (no 0/0). The gradient is straight through: ``dx_q/dx = 1``
(the scale depends on ``x`` but, as in LLM-QAT, no gradient flows through it). ``n`` is 2..8; 16 means not
quantized (:data:`OFF`), which callers handle by not installing a quantizer at all.

Computed in float32 (float64 for float64 inputs) and returned in the input's dtype, as the weight quantizer.
"""
from __future__ import annotations

import torch
from torch import nn

ACT_BITS = (2, 3, 4, 5, 6, 7, 8)
OFF = 16


def check_act_bits(bits: int, name: str = "act_bits") -> int:
    """``bits`` if it is a valid activation / KV width (2..8) or :data:`OFF`; else a one-line ``ValueError``."""
    if isinstance(bits, bool) or bits not in (*ACT_BITS, OFF):
        raise ValueError(f"{name} must be one of {list(ACT_BITS)} or {OFF} (off), got {bits!r}")
    return bits


def act_qmax(bits: int) -> int:
    """The largest code ``Q = 2^(n-1) - 1``; codes lie in ``[-Q, Q]``."""
    if check_act_bits(bits) == OFF:
        raise ValueError(f"{OFF} bits means not quantized: there is no code range")
    return 2 ** (bits - 1) - 1


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _scaled(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x / s, s)`` per token, with ``s`` of shape ``x.shape[:-1] + (1,)``; zero vectors divide by 1."""
    xc = x.to(_compute_dtype(x))
    scale = xc.abs().amax(-1, keepdim=True) / act_qmax(bits)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return xc / safe, scale


def quantize_per_token(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scales)``: int8 codes in ``[-Q, Q]`` (shape of ``x``) and float scales (``x.shape[:-1] + (1,)``)."""
    v, scale = _scaled(x, bits)
    qmax = act_qmax(bits)
    return v.round_().clamp_(-qmax, qmax).to(torch.int8), scale


def dequantize_per_token(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``s * q`` per token, in ``dtype`` (default: the scale's)."""
    x = scale * codes.to(scale.dtype)
    return x if dtype is None else x.to(dtype)


class _PerTokenSTE(torch.autograd.Function):
    """The exact ``s * round(x / s)`` forward (no ``x + (x_q - x).detach()`` rounding), identity backward."""

    @staticmethod
    def forward(ctx, x, bits):
        v, scale = _scaled(x, bits)
        qmax = act_qmax(bits)
        return (scale * v.round_().clamp_(-qmax, qmax)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def fake_quantize_per_token(x: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(x))`` per token, in ``x``'s dtype, with a straight-through (identity) gradient."""
    act_qmax(bits)  # validates before autograd sees it
    return _PerTokenSTE.apply(x, bits)


class PerTokenQuantizer(nn.Module):
    """The dynamic per-token quantizer as a module: it holds only ``bits`` (no parameters, no buffers, so a model
    carrying it has the same state dict as without). Used for linear inputs and for the K/V projections' outputs."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        act_qmax(bits)  # 2..8 only: "off" is the absence of the module, not a module that does nothing
        self.bits = bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize_per_token(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, per_token=True, symmetric=True"

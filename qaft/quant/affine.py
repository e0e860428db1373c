"""The shared integer affine quantizer (LSQ+ style), as pure functions.

For ``n`` bits, signed codes ``q`` lie in ``[Qn, Qp] = [-2^(n-1), 2^(n-1)-1]``::

    v  = (W - b) / s
    q  = clamp(round(v), Qn, Qp)
    Wq = s * q + b          # s > 0 and b per group (b = 0: symmetric)

Straight-through gradients (LSQ+, Bhalgat et al. 2020, https://arxiv.org/abs/2004.09576), with
``inside = [Qn <= v <= Qp]``: dWq/dW = inside; dWq/ds = round(v) - v inside, Qn below, Qp above;
dWq/db = 0 inside, 1 outside. LSQ's gradient scale ``1/sqrt(g * Qp)`` on s and b is optional.

Integer zero point (the GPTQ / AutoGPTQ grid, where 0 is always a level): ``b = s (2^(n-1) - z)`` with an integer
``z`` (:func:`offset_of_zero`); everything below takes the resulting ``b`` like any offset.

Scales and offsets have shape (out, n_groups); the group size is implied by ``in / n_groups``.
Everything is computed in float32 (or the weight's wider dtype) so that a merged integer model
reproduces the training forward bit for bit.
"""
from __future__ import annotations

import math

import torch

from qaft.quant.granularity import grouped

VALID_BITS = (2, 3, 4, 8)


def check_bits(bits: int) -> int:
    if bits not in VALID_BITS:
        raise ValueError(f"bits must be one of {VALID_BITS}, got {bits!r}")
    return bits


def qrange(bits: int) -> tuple[int, int]:
    """Signed code range ``(Qn, Qp)`` for ``bits``."""
    check_bits(bits)
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def _compute_dtype(w: torch.Tensor) -> torch.dtype:
    return torch.float64 if w.dtype == torch.float64 else torch.float32


def _v(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    wg = grouped(w.to(_compute_dtype(w)), scale.shape[-1])
    return (wg - offset.unsqueeze(-1)) / scale.unsqueeze(-1)


def quantize(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed integer codes (int8, shape of ``w``) of ``w`` under per-group ``scale``/``offset``."""
    qn, qp = qrange(bits)
    q = _v(w, scale, offset).round_().clamp_(qn, qp)
    return q.reshape(w.shape).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``s * q + b`` per group, in the scale's dtype."""
    qg = grouped(q.to(scale.dtype), scale.shape[-1])
    return (scale.unsqueeze(-1) * qg + offset.unsqueeze(-1)).reshape(q.shape)


class _ZeroSTE(torch.autograd.Function):
    """``clamp(round(z), 0, levels)`` forward (exactly), identity backward: the straight-through estimator."""

    @staticmethod
    def forward(ctx, z, levels):
        return z.round().clamp_(0, levels)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def offset_of_zero(scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """The offset of the integer-zero grid, ``b = s (2^(n-1) - z_int)``, ``z_int = clamp(round(z), 0, 2^n - 1)``.

    ``z`` may be a trained float: it is rounded (and kept a storable unsigned n-bit zero, so that the code
    ``z_int - 2^(n-1)`` exists and 0 stays a level) with a straight-through gradient. So ``b`` is an integer
    multiple of ``s`` at every step and, by the chain rule, ``dL/dz = -s dL/db`` and ``dL/ds`` gains
    ``(2^(n-1) - z_int) dL/db``. Training and merging call this same function, so they agree bit for bit.
    """
    return scale * (2 ** (check_bits(bits) - 1) - _ZeroSTE.apply(zero, 2**bits - 1))


def lsq_grad_scale(group_numel: int, bits: int) -> float:
    """LSQ's gradient scale for the step size: ``1 / sqrt(numel_per_group * Qp)``."""
    return 1.0 / math.sqrt(group_numel * qrange(bits)[1])


def rtn_weight(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """``dequantize(quantize(w))``: round-to-nearest with fixed ``scale``/``offset``, no gradient to them."""
    return dequantize(quantize(w, scale, offset, bits), scale, offset)


# The straight-through terms below are what every custom backward in qaft builds its gradients from: the
# fake-quantize one here and the low-rank QAT one (qaft.methods.lowrank_qat, eager and compiled).

def in_range(v: torch.Tensor, bits: int) -> torch.Tensor:
    """``Qn <= v <= Qp``: where the straight-through gradient reaches ``W`` (and ``b`` gets none)."""
    qn, qp = qrange(bits)
    return (v >= qn).logical_and_(v <= qp)


def scale_grad_term(q: torch.Tensor, v: torch.Tensor, inside: torch.Tensor,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """``dWq/ds``: ``round(v) - v`` inside the range; outside, the clamped bound, which is ``q`` itself.

    ``out=v`` computes it in place over ``v`` (a row-block backward consumes ``v`` rather than allocate).
    """
    if out is None:
        return torch.where(inside, q - v, q)
    return torch.where(inside, torch.sub(q, v, out=out), q, out=out)


def ste_terms(v: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q, inside, dWq/ds)`` for grouped ``v``."""
    qn, qp = qrange(bits)
    q = v.round().clamp_(qn, qp)
    inside = in_range(v, bits)
    return q, inside, scale_grad_term(q, v, inside)


class _FakeQuantize(torch.autograd.Function):
    """Fake quantization with explicit LSQ+ gradients; saves only ``w``, ``s``, ``b``."""

    @staticmethod
    def forward(ctx, w, scale, offset, bits, grad_scale):
        ctx.save_for_backward(w, scale, offset)
        ctx.bits, ctx.grad_scale = bits, grad_scale
        qn, qp = qrange(bits)
        q = _v(w, scale, offset).round_().clamp_(qn, qp)
        return (scale.unsqueeze(-1) * q + offset.unsqueeze(-1)).reshape(w.shape).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        w, scale, offset = ctx.saved_tensors
        v = _v(w, scale, offset)
        _, inside, ds_term = ste_terms(v, ctx.bits)
        g = grouped(grad.to(v.dtype), scale.shape[-1])
        gw = (g * inside).reshape(w.shape).to(w.dtype) if ctx.needs_input_grad[0] else None
        gs = (g * ds_term).sum(-1) * ctx.grad_scale if ctx.needs_input_grad[1] else None
        gb = (g * ~inside).sum(-1) * ctx.grad_scale if ctx.needs_input_grad[2] else None
        return gw, gs, gb, None, None


def fake_quantize(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int, grad_scale: float = 1.0
) -> torch.Tensor:
    """``dequantize(quantize(w))`` with LSQ+ straight-through gradients for ``w``, ``scale``, ``offset``."""
    return _FakeQuantize.apply(w, scale, offset, check_bits(bits), grad_scale)


def fake_quantize_reference(
    w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int
) -> torch.Tensor:
    """The naive formula ``s * round_ste(clamp(v)) + b``; plain autograd of it gives the LSQ+ gradients.

    This is the reference the custom backwards are tested against, and the "naive autograd" path of
    the memory benchmark: autograd keeps ``v`` and friends alive until backward.
    """
    qn, qp = qrange(bits)
    v = _v(w, scale, offset).clamp(qn, qp)
    q = v + (v.round() - v).detach()
    return (scale.unsqueeze(-1) * q + offset.unsqueeze(-1)).reshape(w.shape).to(w.dtype)

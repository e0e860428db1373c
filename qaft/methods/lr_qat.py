"""LR-QAT (Bondarenko et al. 2024, https://arxiv.org/abs/2406.06385): low-rank QAT in the integer domain.

The base is divided by its initial scale once and stored downcast, ``Phi0 = phi((W0 - b0) / s0)``; the
low-rank term is added in that integer domain and rounded with it::

    C  = alpha B A
    Wq = s * clamp(round_ste(Phi0 + C), Qn, Qp) + b          (symmetric, the default: b = 0)

``phi`` (``downcast``): ``"fixed8"`` (default) stores ``round(clamp(x, Qn, Qp) * 2^(8-n))`` as int8, i.e.
``8 - n`` fractional bits, read back as that integer divided by ``2^(8-n)`` (exact in float32); ``"bf16"``,
``"fp16"`` and ``"fp32"`` store ``x`` in that dtype. ``W0`` itself is not kept: that, and the backward below,
is the memory claim (training memory near LoRA's; the paper's gradient checkpointing of the layer is what
:class:`_LRQATLinear` does by saving only ``x`` and the small tensors and rebuilding ``Wq`` in backward).

Trainable: ``A, B, s`` (``s`` starts at ``s0``, from the ``init``'s range fit: ``minmax`` symmetric by default),
and, asymmetric (``symmetric=False``, an extension: the paper and its code are symmetric), the offset ``b`` (or
the integer zero ``z``, ``b = s (2^(n-1) - round(z))``, :func:`qaft.quant.affine.offset_of_zero`), which never
enters the rounding. Straight-through as written: ``round_ste`` passes the gradient, and ``clamp`` passes it
where its input, the *rounded* value ``r = round(Phi0 + C)``, lies in ``[Qn, Qp]`` (``inside``). With
``G = grad^T x``::

    dx = grad Wq     ds = groupsum(G * q)     db = groupsum(G)     dC = inside * s * G
    dA = alpha B^T dC                         dB = alpha dC A^T

(no LSQ term in ``ds``: ``Phi0`` does not depend on ``s``). Merge: ``q = clamp(round(Phi0 + C), Qn, Qp)`` with
the trained ``s`` (and ``b``): integer codes, the training forward bit for bit. The model does not start
exactly at the PTQ point: ``round(phi(x))`` can differ from ``round(x)`` where the downcast moves ``x`` across a
half (``fixed8`` rounds 1.47 to 1.5 at 4 bits).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from qaft.methods.config import INTEGER, TRAIN, MethodTraits, QuantLoRAMethodConfig, choice, register
from qaft.methods.layer import QUANTIZER, QaftLinear, add_lora, make_quantizer
from qaft.methods.lowrank_qat import _grad_scaled
from qaft.quant.affine import dequantize, qrange
from qaft.quant.granularity import grouped
from qaft.quant.linear import QuantizedLinear

FIXED8 = "fixed8"
DOWNCASTS = {FIXED8: torch.int8, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def downcast(x: torch.Tensor, bits: int, kind: str) -> torch.Tensor:
    """``phi(x)``: the stored form of ``Phi0`` (``x = (W0 - b0) / s0``, any shape)."""
    if kind == FIXED8:
        qn, qp = qrange(bits)
        return x.clamp(qn, qp).mul(2 ** (8 - bits)).round_().to(torch.int8)
    return x.to(DOWNCASTS[kind])


def upcast(phi: torch.Tensor, bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``Phi0`` in ``dtype`` (exact: an int8 over a power of two, or a narrower float)."""
    if phi.dtype == torch.int8:
        return phi.to(dtype).div_(2 ** (8 - bits))
    return phi.to(dtype)


def integer_domain(phi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, bits: int) -> torch.Tensor:
    """``Phi0 + alpha B A`` in float32 (float64 for a float64 adapter), in one fused op; outside autocast, which
    would run it in bf16 under bf16-mixed training and round other codes than the merge computes."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    with torch.autocast(phi.device.type, enabled=False):
        return torch.addmm(upcast(phi, bits, dtype), b.to(dtype), a.to(dtype), alpha=scaling)


def lr_qat_codes(phi, a, b, scaling: float, bits: int) -> torch.Tensor:
    """``clamp(round(Phi0 + C), Qn, Qp)`` in float32 (the merge's codes, as training computes them)."""
    qn, qp = qrange(bits)
    return integer_domain(phi, a, b, scaling, bits).round_().clamp_(qn, qp)


class _LRQATLinear(torch.autograd.Function):
    """``x (s clamp(round(Phi0 + C)) + b)^T`` saving only ``x`` and the small tensors (see the module doc)."""

    @staticmethod
    def forward(ctx, x, phi, a, b, s, off, scaling, bits, grad_scale):
        ctx.save_for_backward(x, phi, a, b, s, off)
        ctx.scaling, ctx.bits, ctx.grad_scale = scaling, bits, grad_scale
        return F.linear(x, dequantize(lr_qat_codes(phi, a, b, scaling, bits), s, off).to(x.dtype))

    @staticmethod
    def backward(ctx, grad):
        x, phi, a, b, s, off = ctx.saved_tensors
        need = ctx.needs_input_grad
        qn, qp = qrange(ctx.bits)
        r = integer_domain(phi, a, b, ctx.scaling, ctx.bits).round_()
        inside = (r >= qn).logical_and_(r <= qp)
        q = r.clamp_(qn, qp)
        dx = grad @ dequantize(q, s, off).to(grad.dtype) if need[0] else None
        da = db_lora = ds = doff = None
        if any(need[2:6]):
            # bf16-mixed: grad arrives in bf16 beside a float32 x; the GEMM runs in grad's dtype, as autocast's
            g2, x2 = grad.reshape(-1, grad.shape[-1]), x.reshape(-1, x.shape[-1]).to(grad.dtype)
            g = grouped((g2.T @ x2).to(q.dtype), s.shape[1])
            doff = g.sum(-1) * ctx.grad_scale if need[5] else None
            ds = (g * grouped(q, s.shape[1])).sum(-1) * ctx.grad_scale if need[4] else None
            dc = g.mul_(s[..., None]).reshape(q.shape).mul_(inside)
            da = (ctx.scaling * (b.to(dc.dtype).T @ dc)).to(a.dtype) if need[2] else None
            db_lora = (ctx.scaling * (dc @ a.to(dc.dtype).T)).to(b.dtype) if need[3] else None
        return dx, None, da, db_lora, ds, doff, None, None, None


def lr_qat_linear(x: torch.Tensor, phi: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor,
                  off: torch.Tensor, scaling: float, bits: int, memory_efficient: bool = True,
                  grad_scale: float = 1.0) -> torch.Tensor:
    """``x Wq^T`` of LR-QAT; ``memory_efficient=False`` is plain autograd of the naive formula (the reference,
    and the memory benchmark's "naive" row); ``grad_scale``: LSQ's factor on the gradients of ``s`` and ``b``."""
    if memory_efficient:
        return _LRQATLinear.apply(x, phi, a, b, s, off, scaling, bits, grad_scale)
    s, off = _grad_scaled(s, grad_scale), _grad_scaled(off, grad_scale)
    qn, qp = qrange(bits)
    z = upcast(phi, bits, a.dtype) + scaling * (b @ a)
    q = (z + (z.round() - z).detach()).clamp(qn, qp)  # round_ste, then clamp: its mask sees the rounded value
    wq = (s[..., None] * grouped(q, s.shape[1]) + off[..., None]).reshape(q.shape)
    return F.linear(x, wq.to(x.dtype))


class LRQATLinear(QaftLinear):
    """``Phi0`` (buffer ``phi``, downcast), LoRA ``A, B`` and the quantizer ``s`` (``b``) that train."""

    PHASES = {TRAIN: frozenset({"lora_A", "lora_B", QUANTIZER})}

    def __init__(self, linear: nn.Linear, config: "LRQATConfig") -> None:
        super().__init__(linear.in_features, linear.out_features, linear.bias, config)
        weight = linear.weight.detach().float()
        self.quantizer = make_quantizer(weight, config)
        s0, b0 = self.quantizer.scale.detach(), self.quantizer.current_offset().detach()
        v0 = (grouped(weight, s0.shape[1]) - b0[..., None]) / s0[..., None]
        self.register_buffer("phi", downcast(v0.reshape(weight.shape), config.bits, config.downcast))
        add_lora(self, config.rank, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c, q = self.config, self.quantizer
        return self._add_bias(lr_qat_linear(x, self.phi, self.lora_A, self.lora_B, q.scale, q.current_offset(),
                                            c.scaling, c.bits, c.memory_efficient, q.grad_scale))

    @torch.no_grad()
    def merge(self) -> QuantizedLinear:
        c, q = self.config, self.quantizer
        codes = lr_qat_codes(self.phi, self.lora_A, self.lora_B, c.scaling, c.bits).to(torch.int8)
        return QuantizedLinear(codes, q.scale, q.current_offset(), c.bits, self.bias)


@register
@dataclass(kw_only=True)
class LRQATConfig(QuantLoRAMethodConfig):
    name = "lr_qat"
    traits = MethodTraits(merges_to=INTEGER, bit_exact=True, trains_quantizer=True)
    # The shared matrix checks the trained offset / integer zero too; the symmetric default has its own tests.
    example_fields: ClassVar = {"group_size": 32, "symmetric": False}
    symmetric: bool = True
    downcast: str = FIXED8  # fixed8 | bf16 | fp16 | fp32
    memory_efficient: bool = True

    def validate(self) -> None:
        super().validate()
        choice("downcast", self.downcast, tuple(DOWNCASTS))

    def make_layer(self, linear: nn.Linear) -> LRQATLinear:
        return LRQATLinear(linear, self)

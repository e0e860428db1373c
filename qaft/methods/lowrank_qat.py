"""LoRA inside the quantizer, with a memory-optimised backward (shared by L4Q and DL-QAT).

    W' = W0 + alpha B A,   Wq = m * Q_{s,b}(W'),   y = x Wq^T      (m = 1 for L4Q)

Plain autograd keeps ``W'``, ``v = (W' - b) / s`` and ``Wq`` of every layer alive until backward. The
custom function below saves only ``x`` and the small tensors (``W0`` is held anyway). Backward recomputes
``W'``, the range mask and ``Wq`` and forms ``G = grad^T x`` once, from which (LSQ+ straight-through terms
as in :mod:`qaft.quant.affine`)::

    dx = grad Wq                     dm = groupsum(G * Q(W'))
    dW' = inside * m * G             dA = alpha B^T dW'        dB = alpha dW' A^T
    ds = groupsum(m * G * (inside ? round(v) - v : Qn|Qp))    db = groupsum(m * G * ~inside)

All weight-sized work runs over blocks of output rows (groups never straddle rows), so the temporaries
are a few MB whatever the layer size, and they are freed before the next layer's backward.
"""
from __future__ import annotations

import torch

from qaft.quant.affine import fake_quantize_reference, ste_terms
from qaft.quant.granularity import grouped
from qaft.quant.init import init_scale_offset

# Elements per row block: bounds the weight-sized temporaries of forward and backward (4 MB in fp32).
BLOCK_ELEMENTS = 1 << 20


def row_blocks(out_features: int, in_features: int):
    step = max(1, BLOCK_ELEMENTS // in_features)
    return [slice(r, min(r + step, out_features)) for r in range(0, out_features, step)]


def effective_weight(w0, a, b, scaling, rows: slice) -> torch.Tensor:
    """``W0 + alpha B A`` for a block of rows, in float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    return w0[rows].to(dtype) + scaling * (b[rows] @ a)


def _block_terms(w0, a, b, s, off, scaling, bits, rows):
    wp = effective_weight(w0, a, b, scaling, rows)
    v = (grouped(wp, s.shape[1]) - off[rows, :, None]) / s[rows, :, None]
    q, inside, ds_term = ste_terms(v, bits)
    return q, inside, ds_term, s[rows, :, None] * q + off[rows, :, None]


def _forward_blocks(x2, w0, a, b, s, off, m, scaling, bits):
    y = x2.new_empty(x2.shape[0], w0.shape[0])
    for rows in row_blocks(*w0.shape):
        *_, wq = _block_terms(w0, a, b, s, off, scaling, bits, rows)
        if m is not None:
            wq = m[rows, :, None] * wq
        y[:, rows] = x2 @ wq.reshape(-1, w0.shape[1]).to(x2.dtype).T
    return y


class _LowRankFakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, a, b, s, off, m, scaling, bits, grad_scale):
        ctx.save_for_backward(x, w0, a, b, s, off, m)
        ctx.scaling, ctx.bits, ctx.grad_scale = scaling, bits, grad_scale
        y = _forward_blocks(x.reshape(-1, x.shape[-1]), w0, a, b, s, off, m, scaling, bits)
        return y.reshape(*x.shape[:-1], w0.shape[0])

    @staticmethod
    def backward(ctx, grad):
        x, w0, a, b, s, off, m = ctx.saved_tensors
        need = ctx.needs_input_grad
        x2, g2 = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grads = _Grads(x2, a, b, s, off, m, need)
        need_g = any(need[2:7])
        for rows in row_blocks(*w0.shape):
            q, inside, ds_term, wq = _block_terms(w0, a, b, s, off, ctx.scaling, ctx.bits, rows)
            g = grouped((g2[:, rows].T @ x2).to(wq.dtype), s.shape[1]) if need_g else None
            if m is not None:
                if grads.m is not None:
                    grads.m[rows] = (g * wq).sum(-1)
                wq = m[rows, :, None] * wq
                g = None if g is None else g * m[rows, :, None]
            if need[0]:
                grads.x.addmm_(g2[:, rows], wq.reshape(-1, x2.shape[1]).to(g2.dtype))
            if g is not None:
                grads.block(rows, g, inside, ds_term, ctx.scaling)
        return grads.result(x, ctx.grad_scale)


class _Grads:
    """Accumulators for the row-block backward; only the needed ones are allocated."""

    def __init__(self, x2, a, b, s, off, m, need):
        self.need = need
        self.x = torch.zeros_like(x2) if need[0] else None
        self.a = torch.zeros_like(a) if need[2] else None
        self.b = torch.zeros_like(b) if need[3] else None
        self.s = torch.zeros_like(s) if need[4] else None
        self.off = torch.zeros_like(off) if need[5] else None
        self.m = torch.zeros_like(m) if m is not None and need[6] else None
        self.lora_a, self.lora_b = a, b

    def block(self, rows, g, inside, ds_term, scaling):
        if self.s is not None:
            self.s[rows] = (g * ds_term).sum(-1)
        if self.off is not None:
            self.off[rows] = (g * ~inside).sum(-1)
        if self.a is not None or self.b is not None:
            dwp = (g * inside).reshape(g.shape[0], -1)
            if self.a is not None:
                self.a.addmm_(self.lora_b[rows].T, dwp, alpha=scaling)
            if self.b is not None:
                self.b[rows] = scaling * (dwp @ self.lora_a.T)

    def result(self, x, grad_scale):
        dx = None if self.x is None else self.x.reshape(x.shape)
        ds = None if self.s is None else self.s * grad_scale
        db = None if self.off is None else self.off * grad_scale
        return dx, None, self.a, self.b, ds, db, self.m, None, None, None


def lowrank_fake_quant_linear(x, w0, a, b, s, off, m, scaling: float, bits: int, grad_scale: float = 1.0,
                              memory_efficient: bool = True) -> torch.Tensor:
    """``x (m * Q_{s,b}(W0 + scaling B A))^T``; ``m`` may be ``None``.

    ``memory_efficient=False`` is plain autograd of the naive formula (the reference, and the
    memory benchmark's "naive" row).
    """
    if memory_efficient:
        return _LowRankFakeQuantLinear.apply(x, w0, a, b, s, off, m, scaling, bits, grad_scale)
    s_, off_ = _grad_scaled(s, grad_scale), _grad_scaled(off, grad_scale)
    wp = w0.to(a.dtype) + scaling * (b @ a)
    wq = fake_quantize_reference(wp, s_, off_, bits)
    if m is not None:
        wq = (m[:, :, None] * grouped(wq, m.shape[1])).reshape(wq.shape)
    return x @ wq.to(x.dtype).T


def _grad_scaled(t: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in value; multiplies the gradient by ``scale`` (LSQ's trick)."""
    return t if scale == 1.0 else t * scale + (t - t * scale).detach()


@torch.no_grad()
def lowrank_codes(w0, a, b, s, off, scaling: float, bits: int) -> torch.Tensor:
    """Signed codes of ``Q_{s,b}(W0 + scaling B A)``, computed block by block exactly as in training."""
    codes = torch.empty(w0.shape, dtype=torch.int8, device=w0.device)
    for rows in row_blocks(*w0.shape):
        q, *_ = _block_terms(w0, a, b, s, off, scaling, bits, rows)
        codes[rows] = q.reshape(-1, w0.shape[1]).to(torch.int8)
    return codes


@torch.no_grad()
def lowrank_minmax(w0, a, b, scaling: float, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(s, b)`` of ``W0 + scaling B A`` per group (DL-QAT's dynamic clipping), block by block."""
    parts = [init_scale_offset(effective_weight(w0, a, b, scaling, rows), bits, group_size)
             for rows in row_blocks(*w0.shape)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

"""LoRA inside the quantizer, with a memory-optimised backward (shared by L4Q and DL-QAT).

    W' = W0 + alpha B A,   Wq = m * Q_{s,b}(W'),   y = x Wq^T      (m = 1 for L4Q)

Plain autograd keeps ``W'``, ``v = (W' - b) / s`` and ``Wq`` of every layer alive until backward. The
custom function below saves only ``x`` and the small tensors (``W0`` is held anyway). Backward recomputes
``W'``, the range mask and ``Wq`` and forms ``G = grad^T x`` once, from which (LSQ+ straight-through terms,
built with :func:`qaft.quant.affine.in_range` and :func:`qaft.quant.affine.scale_grad_term`)::

    dx = grad Wq                     dm = groupsum(G * Q(W'))
    dW' = inside * m * G             dA = alpha B^T dW'        dB = alpha dW' A^T
    ds = groupsum(m * G * (inside ? round(v) - v : Qn|Qp))    db = groupsum(m * G * ~inside)

All weight-sized work runs over blocks of output rows (groups never straddle rows), so the temporaries
are a few MB whatever the layer size, and they are freed before the next layer's backward. Eagerly, the
backward's elementwise terms run as in-place passes; with ``compiled=True`` the pure formula
:func:`grad_terms` goes through ``torch.compile`` instead (one fused loop per block; the forward stays
eager, so the merge stays bit-exact), falling back to eager where compiling fails. The magnitude
is folded into the group parameters, ``Wq = (m s) q + m b``, which is exactly what the merged integer
layer dequantizes, so training forward and deployed model agree bit for bit. On the integer-zero grid the
caller passes ``b = s (2^(n-1) - round(z))`` (:func:`qaft.quant.affine.offset_of_zero`, a straight-through
round on a tiny (out, n_groups) tensor): autograd takes ``dL/db`` from this function to ``s`` and ``z`` by the
chain rule, and nothing weight-sized is added. Cost per layer and step:
one weight-sized GEMM more than LoRA (``G``) plus a handful of in-place elementwise passes over ``W'``.
"""
from __future__ import annotations

import warnings

import torch

from qaft.quant.affine import fake_quantize_reference, in_range, qrange, scale_grad_term
from qaft.quant.granularity import grouped
from qaft.quant.init import ZeroPoint, init_scale_offset, init_scale_zero, parse_zero_point

# Elements per row block: bounds the weight-sized temporaries of forward and backward (4 MB in fp32).
BLOCK_ELEMENTS = 1 << 20


def row_blocks(out_features: int, in_features: int) -> list[slice]:
    step = max(1, BLOCK_ELEMENTS // in_features)
    return [slice(r, min(r + step, out_features)) for r in range(0, out_features, step)]


def effective_weight(w0, a, b, scaling, rows: slice) -> torch.Tensor:
    """``W0 + alpha B A`` for a block of rows, in float32 (float64 for float64 inputs), in one fused op; also under
    autocast (bf16-mixed training), which would round it to bf16 and so give other codes than the merge's."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    with torch.autocast(w0.device.type, enabled=False):
        return torch.addmm(w0[rows].to(dtype), b[rows], a, alpha=scaling)


def _scaled(v: torch.Tensor, s, off, rows: slice) -> torch.Tensor:
    """``(W' - b) / s`` per group, in place on the grouped view of ``W'``."""
    return v.sub_(off[rows, :, None]).div_(s[rows, :, None])


def _block_v(w0, a, b, s, off, scaling, rows) -> torch.Tensor:
    return _scaled(grouped(effective_weight(w0, a, b, scaling, rows), s.shape[1]), s, off, rows)


def _group_params(s, off, m):
    """Scale and offset the deployed layer stores: ``m s`` and ``m b`` (``s``, ``b`` when ``m`` is None)."""
    return (s, off) if m is None else (m * s, m * off)


def _dequantized(q: torch.Tensor, s_eff, off_eff, rows: slice) -> torch.Tensor:
    """``s q + b`` in place on ``q``: the same two roundings as :func:`qaft.quant.affine.dequantize`."""
    return q.mul_(s_eff[rows, :, None]).add_(off_eff[rows, :, None])


def _forward_blocks(x2, w0, a, b, s, off, m, scaling, bits):
    qn, qp = qrange(bits)
    s_eff, off_eff = _group_params(s, off, m)
    blocks = row_blocks(*w0.shape)
    y = None if len(blocks) == 1 else x2.new_empty(x2.shape[0], w0.shape[0])
    for rows in blocks:
        q = _block_v(w0, a, b, s, off, scaling, rows).round_().clamp_(qn, qp)
        wq = _dequantized(q, s_eff, off_eff, rows).reshape(-1, w0.shape[1]).to(x2.dtype)
        if y is None:
            return x2 @ wq.T
        y[:, rows] = x2 @ wq.T
    return y


def grad_terms(v, g, s, off, m, s_eff, off_eff, bits: int, want: tuple[bool, ...]):
    """``(ds, db, dm, dW', Wq)`` of one block (``None`` where not wanted), from the grouped ``v`` and ``G``.

    The pure formula (no argument is modified): what ``torch.compile`` fuses. ``want`` is
    ``(ds, db, dm, dW', Wq)``; ``g`` may be None when only ``Wq`` is wanted; the group parameters are the
    block's rows, ``s_eff`` / ``off_eff`` with ``m`` folded in.
    """
    qn, qp = qrange(bits)
    q = v.round().clamp(qn, qp)
    ds = db = dm = dwp = wq = None
    if g is not None:
        inside = in_range(v, bits)
        if want[2]:
            dm = (g * (q * s[..., None] + off[..., None])).sum(-1)
        if m is not None:
            g = g * m[..., None]
        if want[0]:
            ds = (scale_grad_term(q, v, inside) * g).sum(-1)
        if want[1]:
            db = g.masked_fill(inside, 0).sum(-1)
        if want[3]:
            dwp = g * inside
    if want[4]:
        wq = q * s_eff[..., None] + off_eff[..., None]
    return ds, db, dm, dwp, wq


_COMPILED: dict[str, object] = {}


def _compiled_grad_terms(*args):
    """:func:`grad_terms` through ``torch.compile``; None once compiling has failed on this machine."""
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(grad_terms, dynamic=None)
    if _COMPILED["fn"] is None:
        return None
    try:
        return _COMPILED["fn"](*args)
    except Exception as err:  # noqa: BLE001  (no C++ compiler / Triton, or an inductor bug): stay eager
        warnings.warn(f"torch.compile of the low-rank QAT backward failed, running it eagerly: {err}", stacklevel=2)
        _COMPILED["fn"] = None
        return None


class _LowRankFakeQuantLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w0, a, b, s, off, m, scaling, bits, grad_scale, compiled):
        ctx.save_for_backward(x, w0, a, b, s, off, m)
        ctx.scaling, ctx.bits, ctx.grad_scale, ctx.compiled = scaling, bits, grad_scale, compiled
        # [tokens, out]: the caller reshapes, outside the Function, because a view made inside one cannot be
        # modified in place afterwards (Falcon adds the attention output into the MLP's output in place).
        return _forward_blocks(x.reshape(-1, x.shape[-1]), w0, a, b, s, off, m, scaling, bits)

    @staticmethod
    def backward(ctx, grad):
        x, w0, a, b, s, off, m = ctx.saved_tensors
        # Under autocast (bf16-mixed training) the forward's GEMMs ran in bf16 and ``grad`` arrives in bf16 while a
        # float32 ``x`` was saved: the backward GEMMs run in grad's dtype, as autocast runs a linear layer's.
        x2, g2 = x.reshape(-1, x.shape[-1]).to(grad.dtype), grad.reshape(-1, grad.shape[-1])
        grads = _Grads(x2, w0, a, b, s, off, m, ctx.needs_input_grad, ctx.bits)
        block = grads.compiled_block if ctx.compiled else grads.block
        for rows in row_blocks(*w0.shape):
            block(rows, _block_v(w0, a, b, s, off, ctx.scaling, rows), g2, ctx.scaling)
        return grads.result(x, ctx.grad_scale)


class _Grads:
    """Accumulators for the row-block backward; only the needed ones are allocated."""

    def __init__(self, x2, w0, a, b, s, off, m, need, bits):
        self.x2, self.a, self.b, self.s, self.off, self.m = x2, a, b, s, off, m
        self.s_eff, self.off_eff = _group_params(s, off, m)
        self.bits = bits
        self.qn, self.qp = qrange(bits)
        self.dx = x2.new_zeros(x2.shape) if need[0] and len(row_blocks(*w0.shape)) > 1 else None
        self.need_x = need[0]
        self.da = torch.zeros_like(a) if need[2] else None
        self.db_lora = torch.zeros_like(b) if need[3] else None
        self.ds = torch.zeros_like(s) if need[4] else None
        self.doff = torch.zeros_like(off) if need[5] else None
        self.dm = torch.zeros_like(m) if m is not None and need[6] else None
        self.need_g = any(need[2:7])

    def block(self, rows: slice, v: torch.Tensor, g2: torch.Tensor, scaling: float) -> None:
        """Gradients from one block of rows; ``v`` (grouped) is consumed."""
        q = v.round().clamp_(self.qn, self.qp)
        if self.need_g:
            inside = in_range(v, self.bits)
            g = grouped((g2[:, rows].T @ self.x2).to(v.dtype), v.shape[1])
            self._quantizer_grads(rows, g, q, v, inside)
        if self.need_x:
            self._input_grad(rows, _dequantized(q, self.s_eff, self.off_eff, rows).reshape(-1, self.x2.shape[1])
                             .to(g2.dtype), g2)
        if self.need_g and (self.da is not None or self.db_lora is not None):
            self._lora_grads(rows, g.mul_(inside).reshape(g.shape[0], -1), scaling)

    def compiled_block(self, rows: slice, v: torch.Tensor, g2: torch.Tensor, scaling: float) -> None:
        """:meth:`block` with the elementwise terms from the compiled :func:`grad_terms`."""
        g = grouped((g2[:, rows].T @ self.x2).to(v.dtype), v.shape[1]) if self.need_g else None
        want = (self.ds is not None, self.doff is not None, self.dm is not None,
                self.da is not None or self.db_lora is not None, self.need_x)
        m = None if self.m is None else self.m[rows]
        terms = _compiled_grad_terms(v, g, self.s[rows], self.off[rows], m, self.s_eff[rows], self.off_eff[rows],
                                     self.bits, want)
        if terms is None:
            return self.block(rows, v, g2, scaling)
        ds, db, dm, dwp, wq = terms
        for acc, term in ((self.ds, ds), (self.doff, db), (self.dm, dm)):
            if acc is not None:
                acc[rows] = term
        if wq is not None:
            self._input_grad(rows, wq.reshape(-1, self.x2.shape[1]).to(g2.dtype), g2)
        if dwp is not None:
            self._lora_grads(rows, dwp.reshape(dwp.shape[0], -1), scaling)

    def _input_grad(self, rows: slice, wq: torch.Tensor, g2: torch.Tensor) -> None:
        if self.dx is None:
            self.dx = g2 @ wq
        else:
            self.dx.addmm_(g2[:, rows], wq)

    def _quantizer_grads(self, rows, g, q, v, inside) -> None:
        """dm, then ds and db; leaves ``g`` multiplied by ``m`` (the chain rule through ``m * Q``)."""
        if self.dm is not None:
            self.dm[rows] = (g * _dequantized(q.clone(), self.s, self.off, rows)).sum(-1)
        if self.m is not None:
            g.mul_(self.m[rows, :, None])
        if self.ds is not None:  # written over v, which nothing needs after this
            self.ds[rows] = scale_grad_term(q, v, inside, out=v).mul_(g).sum(-1)
        if self.doff is not None:
            self.doff[rows] = g.masked_fill(inside, 0).sum(-1)

    def _lora_grads(self, rows, dwp, scaling) -> None:
        if self.da is not None:
            self.da.addmm_(self.b[rows].T, dwp, alpha=scaling)
        if self.db_lora is not None:
            self.db_lora[rows] = scaling * (dwp @ self.a.T)

    def result(self, x, grad_scale):
        dx = None if self.dx is None else self.dx.reshape(x.shape)
        ds = None if self.ds is None else self.ds * grad_scale
        db = None if self.doff is None else self.doff * grad_scale
        return dx, None, self.da, self.db_lora, ds, db, self.dm, None, None, None, None


def lowrank_fake_quant_linear(x, w0, a, b, s, off, m, scaling: float, bits: int, grad_scale: float = 1.0,
                              memory_efficient: bool = True, compiled: bool = False) -> torch.Tensor:
    """``x (m * Q_{s,b}(W0 + scaling B A))^T``; ``m`` may be ``None``.

    ``memory_efficient=False`` is plain autograd of the naive formula (the reference, and the
    memory benchmark's "naive" row); ``compiled`` compiles the custom backward's elementwise terms.
    """
    if memory_efficient:
        y = _LowRankFakeQuantLinear.apply(x, w0, a, b, s, off, m, scaling, bits, grad_scale, compiled)
        return y.reshape(*x.shape[:-1], w0.shape[0])
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
    qn, qp = qrange(bits)
    for rows in row_blocks(*w0.shape):
        q = _block_v(w0, a, b, s, off, scaling, rows).round_().clamp_(qn, qp)
        codes[rows] = q.reshape(-1, w0.shape[1]).to(torch.int8)
    return codes


@torch.no_grad()
def lowrank_minmax(w0, a, b, scaling: float, bits: int, group_size: int,
                   zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max ``(s, b)`` of ``W0 + scaling B A`` per group (DL-QAT's dynamic clipping), block by block;
    with ``zero_point="int"`` the integer-grid ``(s, z)`` (:func:`qaft.quant.init.init_scale_zero`)."""
    fit = init_scale_zero if parse_zero_point(zero_point) is ZeroPoint.INT else init_scale_offset
    parts = [fit(effective_weight(w0, a, b, scaling, rows), bits, group_size) for rows in row_blocks(*w0.shape)]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

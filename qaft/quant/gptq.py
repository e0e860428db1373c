"""GPTQ (Frantar et al. 2022, https://arxiv.org/abs/2210.17323) on qaft's shared affine quantizer.

For one linear layer ``y = x W^T`` and calibration inputs ``X``, GPTQ minimises ``||X W^T - X Wq^T||^2``
column by column. With ``H = 2 X^T X`` (the layer-wise Hessian), quantizing column ``j`` to ``q_j`` leaves
an error ``e = (w_j - q_j) / [H^-1]_jj`` that is pushed onto the not yet quantized columns through row ``j``
of ``H^-1``. The paper's three tricks are kept:

* the inverse Hessian is used through the upper Cholesky factor of ``H^-1`` (numerically stable, and its
  rows are exactly the update directions of the sequential elimination);
* updates are applied lazily per block of columns (one matrix product per block);
* dampening ``percdamp * mean(diag H)`` on the diagonal.

Groups, in the reference's order (the authors' ``fasterquant`` with ``groupsize``): without act-order a group's
``(scale, offset)`` is fitted (:func:`qaft.quant.init.init_scale_offset`) when quantization reaches the group's
first column, on the group's columns of ``W`` *as they stand when the current block started*: earlier blocks'
lazy updates are in, the current block's own updates are not (they live in the block's working copy until the
block ends). A group that straddles a block boundary (block size not a multiple of ``g``) reads its tail
columns, beyond the block, from ``W`` too; those columns then receive this block's lazy update and are quantized,
in the next block, with the parameters already fixed. Per channel the parameters are fitted once, up front.
With ``act_order`` columns are visited by descending ``diag(H)``; group parameters are then computed up front
for every group of the original layout (the reference's ``static_groups``), so the output keeps the plain
``(out, in / g)`` layout of :class:`~qaft.quant.linear.QuantizedLinear`.

Fitting on the block-start weights rather than on the in-block-updated ones matters: fitted on the updated
columns, at 2 bits and ``g = 32`` most codes differed from the reference and the output error was worse than
round-to-nearest's (``experiments/analysis/gptq_vs_rtn.py`` measures both against RTN).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch

from qaft.quant.affine import check_bits, qrange
from qaft.quant.init import init_scale_offset


@dataclass(frozen=True)
class GPTQOptions:
    """How GPTQ is calibrated and run: the one definition of these settings (method configs that need GPTQ carry
    the same fields flat, ``method.calib_batches`` etc.). Bits, group size and init come from the method."""

    calib_batches: int = 16   # batches of the training stream the Hessians are accumulated on
    act_order: bool = False   # visit columns by descending Hessian diagonal
    percdamp: float = 0.01    # dampening, a fraction of the Hessian's mean diagonal

    def __post_init__(self) -> None:
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise ValueError(f"calib_batches must be an integer >= 1, got {self.calib_batches!r}")
        if not isinstance(self.act_order, bool):
            raise ValueError(f"act_order must be true or false, got {self.act_order!r}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or self.percdamp < 0:
            raise ValueError(f"percdamp must be a number >= 0, got {self.percdamp!r}")


class HessianAccumulator:
    """Running ``H = 2/n sum_i x_i x_i^T`` over calibration rows (the mean keeps ``H``'s scale batch-free)."""

    def __init__(self, in_features: int, device: torch.device | str = "cpu") -> None:
        self.hessian = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.rows = 0

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        """Add a batch of layer inputs (any leading shape, last dim ``in_features``)."""
        x = x.detach().reshape(-1, x.shape[-1]).to(self.hessian.device, torch.float64)
        n = x.shape[0]
        if n == 0:
            return
        # Rescale the old mean before adding the new rows: float64 keeps this exact enough for 10^6 rows.
        self.hessian.mul_(self.rows / (self.rows + n))
        self.rows += n
        self.hessian.addmm_(x.T, x, alpha=2.0 / self.rows)


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``."""
    h = hessian.clone()
    h.diagonal().add_(percdamp * h.diagonal().mean())
    try:
        chol = torch.linalg.cholesky(h)
    except RuntimeError as err:
        raise ValueError(f"GPTQ: Hessian not positive definite even with percdamp={percdamp}; raise percdamp "
                         "or give more calibration data") from err
    return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)


class _Params:
    """Per-column ``(scale, offset)`` lookup over the (out, n_groups) tables, filled statically or lazily."""

    def __init__(self, out: int, n_groups: int, group_size: int, order: torch.Tensor, dtype: torch.dtype):
        self.scale = torch.zeros(out, n_groups, dtype=dtype, device=order.device)
        self.offset = torch.zeros(out, n_groups, dtype=dtype, device=order.device)
        self.group_of = (order // group_size).tolist()  # group (original layout) of each visited column
        self.group_size = group_size

    def column(self, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.group_of[j]
        return self.scale[:, k], self.offset[:, k]


# Fits one group's (scale, offset), each (out, 1), on its (out x g) weights.
_Fit = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _quantize_block(w: torch.Tensor, i1: int, i2: int, hinv1: torch.Tensor, params: _Params, bits: int,
                    fit: _Fit | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize columns ``i1:i2`` of ``w`` in order; returns (codes, scaled errors) of the block.

    The sequential updates run on a copy of the block: ``w`` itself stays as it was when the block started
    (earlier blocks' lazy updates applied). Dynamic groups (``fit``) are fitted on ``w`` at each group's first
    column, as the reference does; a group that runs past the block reads its tail from ``w`` as well.
    """
    qn, qp = qrange(bits)
    w1 = w[:, i1:i2].clone()
    codes = torch.zeros_like(w1, dtype=torch.int8)
    errors = torch.zeros_like(w1)
    g = params.group_size
    for i in range(w1.shape[1]):
        j = i1 + i
        if fit is not None and j % g == 0:
            s, b = fit(w[:, j:j + g])
            params.scale[:, j // g], params.offset[:, j // g] = s[:, 0], b[:, 0]
        s, b = params.column(j)
        col = w1[:, i]
        q = ((col - b) / s).round_().clamp_(qn, qp)
        codes[:, i] = q.to(torch.int8)
        err = (col - (s * q + b)) / hinv1[i, i]
        w1[:, i:].sub_(err.unsqueeze(1) * hinv1[i, i:].unsqueeze(0))
        errors[:, i] = err
    return codes, errors


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    init: str = "minmax",
    symmetric: bool = False,
    percdamp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    zero_point: str = "float",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of ``weight`` (out x in) with Hessian ``hessian`` (in x in, e.g. from :class:`HessianAccumulator`).

    Returns signed ``codes`` (int8, out x in) and per-group ``scale``, ``offset`` (out, in / group_size;
    ``group_size=-1`` is per channel): ``W ~= scale * codes + offset`` per group, the layout of
    :class:`~qaft.quant.linear.QuantizedLinear`. ``zero_point="int"`` fits the groups on the integer-zero
    grid (``offset = scale * (2^(n-1) - z)``, the reference's own quantizer).

    On CPU this runs on one intra-op thread: its column steps are ~10^5-element operations, too small to gain
    from threads, and with busy cores the threads' synchronisation made them 10x slower (measured on 2 cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit = functools.partial(init_scale_offset, bits=bits, method=init, symmetric=symmetric,
                                zero_point=zero_point)
        return _gptq(weight, hessian, bits, group_size, fit, percdamp, act_order, block_size)
    finally:
        torch.set_num_threads(threads)


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    fit: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    percdamp: float,
    act_order: bool,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    check_bits(bits)
    if percdamp < 0 or block_size < 1:
        raise ValueError(f"percdamp must be >= 0 and block_size >= 1, got {percdamp}, {block_size}")
    out, n_in = weight.shape
    g = n_in if group_size == -1 else group_size
    if n_in % g:
        raise ValueError(f"group_size={group_size} does not divide in_features={n_in}")
    # Everything on the weight's device: a model evaluated on a GPU is quantized there.
    w = weight.detach().to(torch.float64 if weight.dtype == torch.float64 else torch.float32).clone()
    h = hessian.detach().to(w.device, torch.float64).clone()
    # Inputs that never fire carry no information: any code is exact for them, zero keeps H invertible.
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(n_in, device=w.device)
    params = _Params(out, n_in // g, g, order, w.dtype)
    static = act_order or g == n_in
    if static:
        # Static groups: the original layout's groups, fitted up front on the (dead-zeroed) weights. (Per channel
        # the reference fits before zeroing dead inputs; fitting after keeps their weights out of the range,
        # as its group paths do.)
        params.scale[:], params.offset[:] = fit(w, group_size=group_size)
    w, h = w[:, order], h[order][:, order]
    hinv = _inverse_cholesky(h, percdamp).to(w.dtype)
    codes = torch.zeros(out, n_in, dtype=torch.int8, device=w.device)
    for i1 in range(0, n_in, block_size):
        i2 = min(i1 + block_size, n_in)
        codes[:, i1:i2], errors = _quantize_block(
            w, i1, i2, hinv[i1:i2, i1:i2], params, bits, None if static else functools.partial(fit, group_size=-1))
        # Lazy batch update: the block's accumulated error reaches the later columns in one product.
        w[:, i2:] -= errors @ hinv[i1:i2, i2:]
    inverse = torch.argsort(order)
    return codes[:, inverse], params.scale.float(), params.offset.float()


def layer_output_error(x: torch.Tensor, weight: torch.Tensor, weight_q: torch.Tensor) -> float:
    """``||x W^T - x Wq^T||_F``: the objective GPTQ minimises, for tests and reports."""
    x = x.reshape(-1, x.shape[-1]).double()
    return float(torch.linalg.matrix_norm(x @ (weight.double() - weight_q.double()).T))


__all__ = ["GPTQOptions", "HessianAccumulator", "gptq_quantize_weight", "layer_output_error"]

"""Initialisations of per-group ``(scale, offset)`` from a weight (an ablation axis), on either zero-point grid.

**Float zero point** (``zero_point="float"``, the default): the offset ``b`` is any float.

* ``minmax`` (asymmetric): ``s = (max - min) / (2^n - 1)``, ``b = (2^(n-1) max + (2^(n-1) - 1) min) / (2^n - 1)``,
  which maps ``min`` to ``Qn`` and ``max`` to ``Qp`` exactly in exact arithmetic.
* ``l4q`` (symmetric range fit, L4Q): ``s = max(|min / Qn|, |max / Qp|)``, ``b = 0``, which contains both extremes.
* ``mse``: the clipping ratio ``r`` in (0.5, 1] of the min-max range (``[r min, r max]``) that minimises
  ``||W - Wq||^2`` per group.
* ``omniquant_lwc``: OmniQuant's learnable weight clipping (Shao et al., https://arxiv.org/abs/2308.13137): the
  range ``[min sigmoid(beta), max sigmoid(gamma)]`` with per-group ``gamma, beta`` learnt on calibration data
  (:mod:`qaft.methods.lwc`, which fits them block by block and builds each layer inside :func:`clipping`); the
  range is then fitted like ``minmax`` (or symmetric / on the integer grid, as the quantizer's settings say).

Floats round: about a third of float32 groups had the computed ``v = (w - b) / s`` of an extreme a few ulps
outside ``[Qn, Qp]``. The code is the same (the clamp catches it) but the straight-through mask
``Qn <= v <= Qp`` then calls that weight clipped, so its ``ds`` term is the bound instead of ``round(v) - v``
and its ``db`` term is 1 instead of 0: at the first LSQ+ steps ``ds`` was off by 63-220% in norm. So every fit
here ends with :func:`_contain`: ``s`` is raised, by as few ulps as it takes, until ``(w - b) / s`` of the range
ends, computed with the quantizer's own float ops (:func:`qaft.quant.affine._v`), lies inside ``[Qn, Qp]``.
(``(x - b) / s`` moves towards 0 as ``s`` grows, so this always terminates and never pushes the other end out.)

**Integer zero point** (``zero_point="int"``, the GPTQ / AutoGPTQ grid): ``b = s (2^(n-1) - z)`` with an integer
``z`` in ``[0, 2^n - 1]``, i.e. the unsigned form ``W ~= s (u - z)``, ``u = q + 2^(n-1)``. The code ``z - 2^(n-1)``
dequantizes to exactly 0 (``s a + s (-a)`` is exactly 0 in floats), so 0 is always a level; at 2 bits the float
grid ``s {-2, -1, 0, 1} + b`` usually has none.

* ``minmax`` as GPTQ's reference quantizer: the range is extended to include 0 (``xmin = min(min, 0)``,
  ``xmax = max(max, 0)``), ``s = (xmax - xmin) / (2^n - 1)``, ``z = round(-xmin / s)``. Because ``z`` is rounded
  an extreme may fall up to half a step outside the grid and be clipped: the price of the integer zero.
* ``mse``: the same fit on ``[r xmin, r xmax]``, the ratio searched as above.
* ``l4q`` / ``symmetric``: ``b = 0`` already is an integer zero point, ``z = 2^(n-1)``; the fit is unchanged.

Degenerate groups stay finite: on the float grid a constant group gets ``b`` = its value (code 0, exact) and a
small positive scale; on the integer grid an all-zero group gets the reference's range ``[-1, 1]``.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from enum import Enum

import torch

from qaft.quant.affine import check_bits, dequantize, offset_of_zero, qrange, quantize
from qaft.quant.granularity import grouped

# Below this a scale is treated as degenerate: keeps 1/s finite in float32 training.
MIN_SCALE = 1e-8
# Ulp steps _contain may take after its first estimate (at most one was needed in 1,440 random float32 / bf16 fits).
_MAX_ULPS = 64


class Init(str, Enum):
    MINMAX = "minmax"
    L4Q = "l4q"
    MSE = "mse"
    OMNIQUANT_LWC = "omniquant_lwc"


# The learnt clipping ratios (sigmoid(beta), sigmoid(gamma)), (out, n_groups) each, of the layer being built.
_CLIPPING: ContextVar[tuple[torch.Tensor, torch.Tensor] | None] = ContextVar("qaft_lwc_clipping", default=None)


@contextmanager
def clipping(ratios: tuple[torch.Tensor, torch.Tensor] | None) -> Iterator[None]:
    """Within this context ``init="omniquant_lwc"`` fits the range ``[min * ratios[0], max * ratios[1]]``: how
    the ratios learnt for one layer reach the init of whatever that layer's method builds."""
    token = _CLIPPING.set(ratios)
    try:
        yield
    finally:
        _CLIPPING.reset(token)


def _clipped(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ratios = _CLIPPING.get()
    if ratios is None:
        raise ValueError("init='omniquant_lwc' is learnt on calibration data: apply the method with it "
                         "(qaft.apply_method(model, config, calib_batches=...))")
    lo, hi = ratios
    if lo.shape != mn.shape:
        raise ValueError(f"omniquant_lwc: clipping ratios of shape {tuple(lo.shape)} for {tuple(mn.shape)} groups")
    return mn * lo.to(mn.dtype), mx * hi.to(mx.dtype)


class ZeroPoint(str, Enum):
    FLOAT = "float"  # b is any float
    INT = "int"      # b = s (2^(n-1) - z), z an integer: the GPTQ / AutoGPTQ grid


def parse_init(value: str | Init) -> Init:
    try:
        return Init(value)
    except ValueError:
        raise ValueError(f"init must be one of {[i.value for i in Init]}, got {value!r}") from None


def parse_zero_point(value: str | ZeroPoint) -> ZeroPoint:
    try:
        return ZeroPoint(value)
    except ValueError:
        raise ValueError(f"zero_point must be one of {[z.value for z in ZeroPoint]}, got {value!r}") from None


def _group_minmax(w: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    wg = grouped(w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32), n_groups)
    return wg.amin(-1), wg.amax(-1)


def _outside(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Groups whose ``lo`` or ``hi`` falls outside ``[Qn, Qp]`` under the quantizer's own ``(w - b) / s``."""
    qn, qp = qrange(bits)
    return ((lo - offset) / scale < qn) | ((hi - offset) / scale > qp)


def _contain(lo: torch.Tensor, hi: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """``scale``, raised by the fewest ulps that put ``lo`` and ``hi`` inside the code range (see the module doc).

    Groups already inside keep their scale bit for bit.
    """
    bad = _outside(lo, hi, scale, offset, bits)
    if not bad.any():
        return scale
    qn, qp = qrange(bits)
    # The scale the rounding took away, then ulp by ulp where that estimate itself rounded short.
    need = torch.maximum((lo - offset) / qn, (hi - offset) / qp)
    scale = torch.where(bad, torch.maximum(scale, need), scale)
    for _ in range(_MAX_ULPS):
        bad = _outside(lo, hi, scale, offset, bits)
        if not bad.any():
            return scale
        scale = torch.where(bad, torch.nextafter(scale, torch.full_like(scale, float("inf"))), scale)
    raise RuntimeError("could not fit the group ranges inside the code range; please report this weight")


def _float_range(mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, b)`` on the float-offset grid mapping ``[mn, mx]`` onto ``[Qn, Qp]`` (or the symmetric fit)."""
    qn, qp = qrange(bits)
    if symmetric:
        scale = torch.maximum((mn / qn).abs(), (mx / qp).abs())
        offset = torch.zeros_like(scale)
    else:
        levels = 2**bits - 1
        scale = (mx - mn) / levels
        offset = (2 ** (bits - 1) * mx + (2 ** (bits - 1) - 1) * mn) / levels
        offset = torch.where(mx == mn, mn, offset)  # a constant group sits on code 0, exactly
    scale = scale.clamp_min(MIN_SCALE)
    return _contain(mn, mx, scale, offset, bits), offset


def _int_range(mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, z)`` on the integer-zero grid: GPTQ's reference min-max (range extended to include 0)."""
    if symmetric:
        scale, _ = _float_range(mn, mx, bits, True)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    levels = 2**bits - 1
    lo, hi = mn.clamp(max=0), mx.clamp(min=0)
    empty = (lo == 0) & (hi == 0)
    lo, hi = torch.where(empty, -1.0, lo), torch.where(empty, 1.0, hi)
    scale = ((hi - lo) / levels).clamp_min(MIN_SCALE)
    return scale, (-lo / scale).round().clamp(0, levels)


def _fit(mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool, zero_point: ZeroPoint):
    """``(s, b)`` of the range ``[mn, mx]`` on the chosen grid."""
    if zero_point is ZeroPoint.FLOAT:
        return _float_range(mn, mx, bits, symmetric)
    scale, zero = _int_range(mn, mx, bits, symmetric)
    return scale, offset_of_zero(scale, zero, bits)


def _mse_ratio(w: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool,
               zero_point: ZeroPoint, steps: int) -> torch.Tensor:
    """Per group, the clipping ratio (of the ``steps`` in (0.5, 1]) whose fit has the least ``||W - Wq||^2``."""
    n_groups = mn.shape[-1]
    best_err = torch.full_like(mn, float("inf"))
    best_r = torch.ones_like(mn)
    wg = grouped(w.detach().to(mn.dtype), n_groups)
    # Ratios 1, 1 - 0.5/steps, ..., excluding 0.5: the half-open interval (0.5, 1].
    for i in range(steps):
        r = 1.0 - 0.5 * i / steps
        s, b = _fit(mn * r, mx * r, bits, symmetric, zero_point)
        err = (grouped(dequantize(quantize(w, s, b, bits), s, b), n_groups) - wg).pow_(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_r = torch.where(better, torch.full_like(mn, r), best_r)
    return best_r


def _ranges(w, bits, group_size, method, symmetric, zero_point, mse_steps):
    """The per-group range ``[mn, mx]`` the chosen init fits, and whether the fit is symmetric."""
    check_bits(bits)
    method, zero_point = parse_init(method), parse_zero_point(zero_point)
    n_groups = 1 if group_size == -1 else w.shape[1] // group_size
    mn, mx = _group_minmax(w, n_groups)
    symmetric = symmetric or method is Init.L4Q
    if method is Init.MSE:
        r = _mse_ratio(w, mn, mx, bits, symmetric, zero_point, mse_steps)
        mn, mx = mn * r, mx * r
    elif method is Init.OMNIQUANT_LWC:
        mn, mx = _clipped(mn, mx)
    return mn, mx, symmetric, zero_point


def init_scale_offset(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    method: str | Init = Init.MINMAX,
    symmetric: bool = False,
    mse_steps: int = 20,
    zero_point: str | ZeroPoint = ZeroPoint.FLOAT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, offset)``, each of shape (out, in / group_size); ``group_size=-1`` is per channel.

    ``symmetric=True`` forces ``b = 0`` (``minmax`` then fits the symmetric range like ``l4q``).
    ``zero_point="int"`` returns ``offset = scale * (2^(n-1) - z)`` for the integer ``z`` of
    :func:`init_scale_zero`.
    """
    mn, mx, symmetric, zero_point = _ranges(w, bits, group_size, method, symmetric, zero_point, mse_steps)
    return _fit(mn, mx, bits, symmetric, zero_point)


def init_scale_zero(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    method: str | Init = Init.MINMAX,
    symmetric: bool = False,
    mse_steps: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, zero)`` on the integer-zero grid: ``zero`` holds integers in ``[0, 2^n - 1]``
    (a float tensor, so it can be trained through a straight-through round)."""
    mn, mx, symmetric, _ = _ranges(w, bits, group_size, method, symmetric, ZeroPoint.INT, mse_steps)
    return _int_range(mn, mx, bits, symmetric)

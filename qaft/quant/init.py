"""Initialisations of per-group ``(scale, offset)`` from a weight (an ablation axis).

* ``minmax`` (asymmetric): ``s = (max - min) / (2^n - 1)``, ``b = (2^(n-1) max + (2^(n-1) - 1) min) / (2^n - 1)``,
  which maps ``min`` to ``Qn`` and ``max`` to ``Qp`` exactly.
* ``l4q`` (symmetric range fit, L4Q): ``s = max(|min / Qn|, |max / Qp|)``, ``b = 0``.
* ``mse``: the clipping ratio ``r`` in (0.5, 1] of the min-max range (``[r min, r max]``) that minimises
  ``||W - Wq||^2`` per group.

A degenerate group (max = min) gets a small positive scale, so every code stays finite.
"""
from __future__ import annotations

from enum import Enum

import torch

from qaft.quant.affine import check_bits, dequantize, quantize, qrange
from qaft.quant.granularity import grouped

# Below this a scale is treated as degenerate: keeps 1/s finite in float32 training.
MIN_SCALE = 1e-8


class Init(str, Enum):
    MINMAX = "minmax"
    L4Q = "l4q"
    MSE = "mse"


def parse_init(value: str | Init) -> Init:
    try:
        return Init(value)
    except ValueError:
        raise ValueError(f"init must be one of {[i.value for i in Init]}, got {value!r}") from None


def _group_minmax(w: torch.Tensor, n_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    wg = grouped(w.detach().to(torch.float64 if w.dtype == torch.float64 else torch.float32), n_groups)
    return wg.amin(-1), wg.amax(-1)


def _from_range(mn: torch.Tensor, mx: torch.Tensor, bits: int, symmetric: bool):
    qn, qp = qrange(bits)
    if symmetric:
        scale = torch.maximum((mn / qn).abs(), (mx / qp).abs())
        offset = torch.zeros_like(scale)
    else:
        levels = 2**bits - 1
        scale = (mx - mn) / levels
        offset = (2 ** (bits - 1) * mx + (2 ** (bits - 1) - 1) * mn) / levels
    return scale.clamp_min(MIN_SCALE), offset


def _mse_search(w, mn, mx, bits, symmetric, steps):
    n_groups = mn.shape[-1]
    best_err = torch.full_like(mn, float("inf"))
    best_s, best_b = _from_range(mn, mx, bits, symmetric)
    wg = grouped(w.detach().to(mn.dtype), n_groups)
    # Ratios 1, 1 - 0.5/steps, ..., excluding 0.5: the half-open interval (0.5, 1].
    for i in range(steps):
        r = 1.0 - 0.5 * i / steps
        s, b = _from_range(mn * r, mx * r, bits, symmetric)
        err = (grouped(dequantize(quantize(w, s, b, bits), s, b), n_groups) - wg).pow_(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s, best_b = torch.where(better, s, best_s), torch.where(better, b, best_b)
    return best_s, best_b


def init_scale_offset(
    w: torch.Tensor,
    bits: int,
    group_size: int,
    method: str | Init = Init.MINMAX,
    symmetric: bool = False,
    mse_steps: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(scale, offset)``, each of shape (out, in / group_size); ``group_size=-1`` is per channel.

    ``symmetric=True`` forces ``b = 0`` (``minmax`` then fits the symmetric range like ``l4q``).
    """
    check_bits(bits)
    method = parse_init(method)
    n_groups = 1 if group_size == -1 else w.shape[1] // group_size
    mn, mx = _group_minmax(w, n_groups)
    symmetric = symmetric or method is Init.L4Q
    if method is Init.MSE:
        return _mse_search(w, mn, mx, bits, symmetric, mse_steps)
    return _from_range(mn, mx, bits, symmetric)

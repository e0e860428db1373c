"""Oracle: qaft's GPTQ gives exactly the codes of an independent, plain-loop GPTQ written from the paper.

The reference below follows Frantar et al. 2022 (Algorithm 1) and the authors' ``fasterquant``: ``H = 2 X^T X / n``,
dead inputs zeroed, dampening ``percdamp * mean(diag H)``, the upper Cholesky factor ``U`` of ``H^-1``
(``H^-1 = U^T U``), blocks of 128 columns with the error of a block pushed onto later columns only when the
block ends, group parameters fitted when the loop reaches a group's first column on ``W`` as it stands (earlier
blocks' updates in, the current block's not), and with act-order static groups fitted up front on the
unpermuted ``W``. The quantizer is pluggable: the float-offset min-max of the spec, or the reference's own
integer-zero quantizer (unsigned codes ``u = clamp(round(w / s) + z, 0, 2^n - 1)``, ``w ~ s (u - z)``).
Everything is float64, so the two implementations, whose float operations differ, could part only where a value
lies within float64 noise of a rounding tie.
"""
from __future__ import annotations

import pytest
import torch

from qaft.quant.gptq import gptq_quantize_weight

F64 = torch.float64


class FloatGrid:
    """The spec's float-offset min-max: ``s = (max - min) / (2^n - 1)``, ``b`` maps min to Qn, max to Qp."""

    def __init__(self, bits: int) -> None:
        self.bits, self.half, self.levels = bits, 2 ** (bits - 1), 2**bits - 1

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = w.min(1).values, w.max(1).values
        return (hi - lo) / self.levels, (self.half * hi + (self.half - 1) * lo) / self.levels

    def quantize(self, col: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        s, b = params
        q = torch.clamp(torch.round((col - b) / s), -self.half, self.half - 1)
        return q, s * q + b

    def offset(self, params) -> torch.Tensor:
        return params[1]


class IntGrid(FloatGrid):
    """GPTQ's reference quantizer: range widened to include 0, integer zero ``z = round(-xmin / s)``."""

    def fit(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lo = torch.clamp(w.min(1).values, max=0)
        hi = torch.clamp(w.max(1).values, min=0)
        empty = (lo == 0) & (hi == 0)
        lo[empty], hi[empty] = -1.0, 1.0
        s = (hi - lo) / self.levels
        return s, torch.round(-lo / s)

    def quantize(self, col: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor]:
        s, z = params
        u = torch.clamp(torch.round(col / s) + z, 0, self.levels)
        return u - self.half, s * (u - z)

    def offset(self, params) -> torch.Tensor:
        s, z = params
        return s * (self.half - z)


def reference_gptq(w, h, grid, groupsize: int, act_order: bool, blocksize: int = 128, percdamp: float = 0.01):
    """Signed codes and per-group ``(scale, offset)`` (original layout) of the published algorithm."""
    w, h = w.clone(), h.clone()
    n = w.shape[1]
    g = n if groupsize == -1 else groupsize
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    params = {}
    if act_order or g == n:  # static: every group of the original layout, up front
        params = {k: grid.fit(w[:, k * g:(k + 1) * g]) for k in range(n // g)}
    perm = torch.argsort(torch.diag(h), descending=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=F64)
    u = torch.linalg.cholesky(torch.linalg.inv(h)).T  # H^-1 = U^T U, U upper
    codes = torch.zeros_like(w)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros_like(w[:, i1:i2])
        for i in range(i2 - i1):
            col = i1 + i
            group = int(perm[col]) // g
            if group not in params:  # dynamic: the group's first column; W as it stands at the block's start
                assert col % g == 0
                params[group] = grid.fit(w[:, col:col + g])
            codes[:, col], deq = grid.quantize(w1[:, i], params[group])
            err = (w1[:, i] - deq) / u[col, col]
            w1[:, i:] -= err[:, None] * u[col, col:i2][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    codes = codes[:, torch.argsort(perm)]
    scale = torch.stack([params[k][0] for k in range(n // g)], 1)
    offset = torch.stack([grid.offset(params[k]) for k in range(n // g)], 1)
    return codes.to(torch.int8), scale, offset


def _layer(out: int = 256, n_in: int = 512, n: int = 2048, seed: int = 0, dead: int = 0):
    """A random weight and the Hessian of correlated calibration inputs with uneven feature scales."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out, n_in, generator=gen, dtype=F64)
    mix = torch.randn(n_in, n_in, generator=gen, dtype=F64) / n_in**0.5
    x = (torch.randn(n, n_in, generator=gen, dtype=F64) @ mix + 0.3 * torch.randn(n, n_in, generator=gen, dtype=F64))
    x = x * torch.linspace(0.1, 3.0, n_in, dtype=F64)
    x[:, torch.randperm(n_in, generator=gen)[:dead]] = 0  # inputs that never fire
    return w, 2 * x.T @ x / n


def _check(w, h, bits, group_size, act_order, zero_point, block_size=128) -> None:
    grid = (IntGrid if zero_point == "int" else FloatGrid)(bits)
    ref_codes, ref_scale, ref_offset = reference_gptq(w, h, grid, group_size, act_order, block_size)
    codes, scale, offset = gptq_quantize_weight(w, h, bits, group_size, act_order=act_order, block_size=block_size,
                                                zero_point=zero_point)
    differ = int((codes != ref_codes).sum())
    assert differ == 0, f"{differ} of {codes.numel()} codes differ"
    # qaft returns float32 group parameters (QuantizedLinear's storage): equal to one float32 rounding
    torch.testing.assert_close(scale.double(), ref_scale, rtol=2**-23, atol=0)
    torch.testing.assert_close(offset.double(), ref_offset, rtol=2**-23, atol=1e-7 * float(ref_scale.max()))
    if zero_point == "int":  # the integer zero comes back exactly from the stored pair
        half = 2 ** (bits - 1)
        z = torch.round(half - offset.double() / scale.double())
        ref_z = torch.round(half - ref_offset / ref_scale)
        assert torch.equal(z, ref_z) and bool(((z >= 0) & (z <= 2**bits - 1)).all())


@pytest.mark.parametrize("zero_point", ["float", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])  # 128 < the block of 128 < per channel (512)
def test_codes_equal_the_reference(group_size, act_order, bits, zero_point):
    w, h = _layer(seed=bits)
    _check(w, h, bits, group_size, act_order, zero_point)


@pytest.mark.parametrize("zero_point", ["float", "int"])
@pytest.mark.parametrize("group_size, block_size", [(64, 96), (32, 80), (256, 128), (128, 200)])
def test_groups_straddling_blocks_equal_the_reference(group_size, block_size, zero_point):
    """A block size that is no multiple of the group: a group's tail lies beyond its first column's block."""
    w, h = _layer(seed=7)
    _check(w, h, 2, group_size, False, zero_point, block_size)


@pytest.mark.parametrize("act_order", [False, True])
def test_dead_inputs_equal_the_reference(act_order):
    w, h = _layer(seed=11, dead=40)
    for zero_point in ("float", "int"):
        _check(w, h, 3, 64, act_order, zero_point)


def test_the_reference_is_gptq():
    """Sanity of the oracle itself: with no Hessian coupling (H = I) GPTQ is round-to-nearest per group."""
    w, _ = _layer(out=8, n_in=256)
    codes, _, _ = reference_gptq(w, torch.eye(256, dtype=F64), FloatGrid(3), 64, False)
    for k in range(4):
        part = w[:, k * 64:(k + 1) * 64]
        s, b = FloatGrid(3).fit(part)
        expected = torch.clamp(torch.round((part - b[:, None]) / s[:, None]), -4, 3)
        assert torch.equal(codes[:, k * 64:(k + 1) * 64].double(), expected)

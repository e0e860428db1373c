"""The min-max boundary: the init's float arithmetic keeps every weight inside the code range.

Min-max maps ``min`` to ``Qn`` and ``max`` to ``Qp`` in exact arithmetic, so every weight is inside and the
first LSQ+ step has ``db = 0`` and ``ds = groupsum(G (round(v) - v))``. In float32 the computed ``v`` of an
extreme used to land a few ulps outside in about a third of the groups, which the straight-through mask read as
clipped. These tests compare against that exact arithmetic (float64, extremes exactly on Qn / Qp).
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qaft
from qaft.quant import fake_quantize, init_scale_offset, qrange
from qaft.quant.affine import _v
from qaft.quant.init import _float_range

SHAPES = [(32, 512), (7, 96), (64, 1536)]
BITS = [2, 3, 4, 8]


def _weight(shape, seed: int, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # mixed magnitudes: a few rows a thousand times larger, as outlier channels in LLMs
    w = torch.randn(shape, generator=gen) * torch.logspace(-2, 1, shape[0])[:, None]
    return w.to(dtype)


def _groups(shape, group_size: int) -> int:
    return 1 if group_size == -1 else shape[1] // group_size


def _exact_first_step(w: torch.Tensor, g: torch.Tensor, bits: int, n_groups: int):
    """LSQ+ ``(ds, db)`` in float64 for min-max with ``min -> Qn``, ``max -> Qp`` exactly (all inside)."""
    qn, qp = qrange(bits)
    wg = w.double().reshape(w.shape[0], n_groups, -1)
    mn, mx = wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True)
    half, levels = 2 ** (bits - 1), 2**bits - 1
    s, b = (mx - mn) / levels, (half * mx + (half - 1) * mn) / levels
    v = ((wg - b) / s).clamp(qn, qp)  # exact arithmetic puts the extremes on the bounds
    gg = g.double().reshape(wg.shape)
    return (gg * (v.round() - v)).sum(-1), torch.zeros(w.shape[0], n_groups, dtype=torch.float64), v


def _upstream(w: torch.Tensor, bits: int, n_groups: int, seed: int) -> torch.Tensor:
    """A random upstream gradient, zero where ``v`` is within 1e-4 of a rounding tie: there float32 and exact
    arithmetic may legitimately round apart, which is not what these tests are about."""
    _, _, v = _exact_first_step(w, torch.zeros_like(w), bits, n_groups)
    g = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed + 100))
    near_tie = ((v - v.floor()) - 0.5).abs() < 1e-4
    return g.masked_fill(near_tie.reshape(w.shape), 0.0)


def _assert_first_step(ds, db, w, g, bits, n_groups) -> None:
    ds_ref, db_ref, _ = _exact_first_step(w, g, bits, n_groups)
    assert torch.equal(db.double(), db_ref), "an extreme was treated as clipped: db must be exactly 0"
    # float32 v differs from exact by a few ulps of |v| <= 2^(n-1): tiny next to one misread element (~|G|)
    tol = 1e-4 * g.abs().double().reshape(ds_ref.shape + (-1,)).sum(-1)
    assert bool(((ds.double() - ds_ref).abs() <= tol).all()), float(((ds.double() - ds_ref).abs() - tol).max())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, 64, -1])
def test_minmax_puts_every_weight_inside(dtype, bits, group_size):
    qn, qp = qrange(bits)
    for shape in SHAPES:
        for seed in range(4):
            w = _weight(shape, seed, dtype)
            s, b = init_scale_offset(w, bits, group_size)
            v = _v(w, s, b)  # exactly the quantizer's own float arithmetic
            assert bool(((v >= qn) & (v <= qp)).all())
            assert bool((v.amin(-1).round() == qn).all()) and bool((v.amax(-1).round() == qp).all())
            # raised by a few ulps at most, and only where needed: still the spec's min-max
            wg = w.float().reshape(shape[0], s.shape[1], -1)
            spec = (wg.amax(-1) - wg.amin(-1)) / (2**bits - 1)
            assert bool((s >= spec).all()) and bool(((s - spec) <= 4 * torch.finfo(torch.float32).eps * spec).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", [32, -1])
def test_first_step_gradients_equal_exact_arithmetic(dtype, bits, group_size):
    """``fake_quantize``'s backward at the min-max init: ``db = 0`` exactly, ``ds`` the exact LSQ+ value."""
    for seed in range(3):
        w = _weight((32, 512), seed, dtype)
        n_groups = _groups(w.shape, group_size)
        g = _upstream(w, bits, n_groups, seed).to(dtype).float()  # the gradient reaches the quantizer in w's dtype
        s, b = (t.requires_grad_() for t in init_scale_offset(w, bits, group_size))
        (fake_quantize(w, s, b, bits) * g.to(dtype)).float().sum().backward()
        _assert_first_step(s.grad, b.grad, w, g, bits, n_groups)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("group_size", [32, -1])
def test_dlqat_phase_one_first_step_equals_exact_arithmetic(dtype, bits, group_size):
    """DL-QAT phase 1 (``s, b`` only, through the low-rank QAT backward): with ``x = I`` the weight-space
    gradient ``G = grad^T x`` is the chosen upstream gradient itself."""
    in_features = 256
    for seed in range(2):
        linear = nn.Linear(in_features, 48, bias=False)
        with torch.no_grad():
            linear.weight.copy_(_weight((48, in_features), seed, torch.float32))
        linear = linear.to(dtype)
        config = qaft.config_for("dlqat", bits=bits, group_size=group_size, rank=4)
        layer = config.make_layer(linear)
        layer.set_phase("quant")
        w = linear.weight.detach()
        n_groups = _groups(w.shape, group_size)
        g = _upstream(w, bits, n_groups, seed)
        y = layer(torch.eye(in_features))
        (y * g.T).sum().backward()
        _assert_first_step(layer.quantizer.scale.grad, layer.quantizer.offset.grad, w, g, bits, n_groups)


@pytest.mark.parametrize("bits", BITS)
def test_symmetric_fit_contains_both_extremes(bits):
    """L4Q's ``s = max(|min / Qn|, |max / Qp|)``, ``b = 0`` is meant to contain the whole group."""
    qn, qp = qrange(bits)
    for seed in range(6):
        w = _weight((64, 512), seed, torch.float32)
        for group_size in (32, -1):
            s, b = init_scale_offset(w, bits, group_size, "l4q")
            v = _v(w, s, b)
            assert bool((b == 0).all()) and bool(((v >= qn) & (v <= qp)).all())


@pytest.mark.parametrize("bits", BITS)
def test_mse_candidates_contain_their_own_range(bits):
    """Each clipping candidate ``[r min, r max]`` of the mse search maps its own ends inside the code range,
    so what it clips is exactly what lies beyond ``r``; and the chosen fit keeps those ends inside too."""
    qn, qp = qrange(bits)
    w = _weight((64, 512), 0, torch.float32)
    wg = w.reshape(64, 16, 32)
    mn, mx = wg.amin(-1), wg.amax(-1)
    for i in range(20):
        r = 1.0 - 0.5 * i / 20
        for symmetric in (False, True):
            s, b = _float_range(mn * r, mx * r, bits, symmetric)
            assert bool(((mn * r - b) / s >= qn).all()) and bool(((mx * r - b) / s <= qp).all())
    s, b = init_scale_offset(w, bits, 32, "mse")
    v = _v(w, s, b)
    inside = (v >= qn) & (v <= qp)
    assert bool(inside.any(-1).all())  # the mse fit clips some weights, never a whole group

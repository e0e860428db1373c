"""The shared quantizer: gradients, initialisations, packing, and agreement with independent implementations."""
import pytest
import torch

import qaft.quant as Q
from qaft.quant.init import MIN_SCALE
from qaft.quant.packing import packed_length

from helpers import DEVICES


def _weights(out=16, inp=128, seed=0, dtype=torch.float64):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("grad_scale", [1.0, 0.05])
@pytest.mark.parametrize("device", DEVICES)
def test_fake_quantize_gradients_equal_autograd_of_naive_formula(bits, group_size, grad_scale, device):
    w = _weights().to(device)
    s, b = Q.init_scale_offset(w, bits, group_size)
    s, b = s * 0.8, b + 0.01  # shrink the range so that some values clip
    g = torch.randn_like(w)
    grads = []
    for fq in ("custom", "reference"):
        wv, sv, bv = (t.clone().requires_grad_() for t in (w, s, b))
        if fq == "custom":
            out = Q.fake_quantize(wv, sv, bv, bits, grad_scale)
        else:
            scaled = [t * grad_scale + (t - t * grad_scale).detach() for t in (sv, bv)]
            out = Q.fake_quantize_reference(wv, *scaled, bits)
        (out * g).sum().backward()
        grads.append((out.detach(), wv.grad, sv.grad, bv.grad))
    for custom, reference in zip(*grads):
        torch.testing.assert_close(custom, reference, rtol=1e-12, atol=1e-12)


def test_lsq_plus_gradient_terms_by_hand():
    w = torch.tensor([[-10.0, 0.26, 0.74, 10.0]], dtype=torch.float64)
    s = torch.tensor([[1.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[0.0]], dtype=torch.float64, requires_grad=True)
    wv = w.clone().requires_grad_()
    Q.fake_quantize(wv, s, b, 2).sum().backward()  # 2 bits: Qn = -2, Qp = 1
    assert wv.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]
    assert s.grad.item() == pytest.approx(-2 + (0 - 0.26) + (1 - 0.74) + 1)
    assert b.grad.item() == 2.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_maps_min_and_max_to_the_code_range(bits):
    w = _weights()
    s, b = Q.init_scale_offset(w, bits, 32)
    q = Q.quantize(w, s, b, bits).view(16, 4, 32)
    qn, qp = Q.qrange(bits)
    assert (q.amin(-1) == qn).all() and (q.amax(-1) == qp).all()
    wg = w.view(16, 4, 32)
    torch.testing.assert_close(s * qn + b, wg.amin(-1))
    torch.testing.assert_close(s * qp + b, wg.amax(-1))


def test_l4q_init_is_the_symmetric_range_fit():
    w = _weights()
    s, b = Q.init_scale_offset(w, 4, 64, "l4q")
    wg = w.view(16, 2, 64)
    expected = torch.maximum(wg.amin(-1).abs() / 8, wg.amax(-1).abs() / 7)
    torch.testing.assert_close(s, expected)
    assert (b == 0).all()


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_mse_init_never_worse_than_minmax(bits):
    w = _weights(dtype=torch.float32)
    errors = {}
    for init in ("minmax", "mse"):
        s, b = Q.init_scale_offset(w, bits, 32, init)
        errors[init] = (Q.dequantize(Q.quantize(w, s, b, bits), s, b) - w).pow(2).view(16, 4, 32).sum(-1)
    assert (errors["mse"] <= errors["minmax"] + 1e-7).all()
    assert errors["mse"].sum() < errors["minmax"].sum()


@pytest.mark.parametrize("init", ["minmax", "l4q", "mse"])
def test_degenerate_groups_stay_finite(init):
    w = torch.zeros(4, 64)
    w[1] = 3.5  # constant group, non-zero
    s, b = Q.init_scale_offset(w, 4, 32, init)
    assert torch.isfinite(s).all() and (s >= MIN_SCALE).all()
    wq = Q.fake_quantize(w.requires_grad_(), s.requires_grad_(), b.requires_grad_(), 4)
    wq.sum().backward()
    assert torch.isfinite(wq).all() and torch.isfinite(s.grad).all()
    torch.testing.assert_close(wq.detach(), w.detach())


def test_granularity_types():
    assert Q.granularity(-1) == Q.PerChannel()
    assert Q.granularity(64) == Q.PerGroup(64)
    assert Q.PerChannel().group_size(576) == 576
    with pytest.raises(ValueError, match="group_size=128 does not divide in_features=576"):
        Q.PerGroup(128).group_size(576)
    with pytest.raises(ValueError, match="group_size"):
        Q.granularity(0)


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_bad_bits_name_the_allowed_values(bits):
    with pytest.raises(ValueError, match=r"bits must be one of \(2, 3, 4, 8\)"):
        Q.init_scale_offset(_weights(), bits, 32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("shape", [(1, 8), (7, 37), (3, 5, 64), (2, 1)])
def test_packing_round_trip(bits, shape):
    codes = torch.randint(0, 2**bits, shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
    packed = Q.pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == packed_length(shape[-1], bits) == (shape[-1] if bits == 8 else (shape[-1] + 7) // 8 * bits)
    assert torch.equal(Q.unpack_codes(packed, bits, shape[-1]), codes)


def _big_endian_octets(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The layout by its definition: 8 codes as one big-endian ``8 * bits``-bit word, code ``j`` at ``bits (7 - j)``."""
    k = codes.shape[-1]
    octets = torch.nn.functional.pad(codes.to(torch.int64), (0, (-k) % 8)).view(*codes.shape[:-1], -1, 8)
    word = (octets << bits * torch.arange(7, -1, -1)).sum(-1, keepdim=True)
    return ((word >> 8 * torch.arange(bits - 1, -1, -1)) & 0xFF).to(torch.uint8).reshape(*codes.shape[:-1], -1)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(1, 8), (7, 37), (3, 5, 64), (13,)])
def test_packing_is_the_big_endian_octet_layout(bits, shape):
    codes = torch.randint(0, 2**bits, shape, generator=torch.Generator().manual_seed(bits))
    for dtype in (torch.uint8, torch.int64):
        assert torch.equal(Q.pack_codes(codes.to(dtype), bits), _big_endian_octets(codes, bits))


def test_four_bit_layout_is_high_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert Q.pack_codes(codes, 4).tolist() == [[0x12, 0xF0, 0, 0]]


def test_four_bit_packing_reaches_the_int4_kernel():
    w = _weights(64, 256, dtype=torch.float32)
    s, b = Q.init_scale_offset(w, 4, 32)
    q = Q.quantize(w, s, b, 4)
    unsigned = (q.to(torch.int16) + 8).to(torch.uint8)
    weight = Q.to_int4pack_cpu(Q.pack_codes(unsigned, 4), 256)
    scales_and_zeros = torch.stack([s.T, b.T], -1).contiguous()  # the kernel's zero is qaft's float offset
    x = torch.randn(5, 256)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, 32, scales_and_zeros)
    torch.testing.assert_close(y, x @ Q.dequantize(q, s, b).T, rtol=1e-4, atol=1e-4)


def test_quantizer_module_holds_parameters():
    w = _weights(dtype=torch.float32)
    module = Q.AffineQuantizer(w, 4, 32, init="minmax", use_grad_scale=True)
    assert {n for n, _ in module.named_parameters()} == {"scale", "offset"}
    out = module(w.clone().requires_grad_())
    out.sum().backward()
    assert module.scale.grad is not None
    sym = Q.AffineQuantizer(w, 4, 32, init="l4q", symmetric=True)
    assert {n for n, _ in sym.named_parameters()} == {"scale"}
    assert torch.equal(sym.codes(w), Q.quantize(w, sym.scale, sym.offset, 4))


def test_quantizer_module_with_integer_zero_point_learns_z():
    w = _weights(dtype=torch.float32)
    module = Q.AffineQuantizer(w, 2, 32, zero_point="int")
    assert {n for n, _ in module.named_parameters()} == {"scale", "zero"}
    assert torch.equal(module.zero, module.zero.round())
    module(w).sum().backward()
    assert module.zero.grad is not None and module.scale.grad is not None
    # symmetric is already an integer zero point (z = 2^(n-1)): the zero offset buffer stays
    sym = Q.AffineQuantizer(w, 2, 32, init="l4q", symmetric=True, zero_point="int")
    assert {n for n, _ in sym.named_parameters()} == {"scale"} and bool((sym.offset == 0).all())

"""NF4 and its double quantization on their own (tests/unit/test_oracles.py compares them with bitsandbytes)."""
import pytest
import torch

import qaft
from qaft.quant import nf4 as N


def _absmax(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g).abs() * torch.rand(n, generator=g).exp()


def test_dynamic_map_shape_and_decades():
    m = N.DYNAMIC_MAP
    assert m.shape == (256,) and m.dtype == torch.float32
    assert torch.all(m[1:] > m[:-1])  # sorted, no repeats
    assert m[-1] == 1 and m[127] == 0 and m[0] == -m[-2]
    positive = m[128:-1]
    # 2**k values in the decade of 10**(k-6), for k = 0..6: 1 + 2 + ... + 64 = 127 positive values below 1.
    for k in range(7):
        in_decade = (positive >= 0.1 * 10.0 ** (k - 6)) & (positive < 10.0 ** (k - 6))
        assert in_decade.sum() == 2**k
    assert torch.equal(m[:127], -m[128:-1].flip(0))


def test_nearest_index_is_a_nearest_level():
    levels = N.DYNAMIC_MAP
    x = torch.cat([torch.rand(20000, generator=torch.Generator().manual_seed(1)) * 2.2 - 1.1,
                   torch.randn(5000, generator=torch.Generator().manual_seed(2)) * 1e-4])
    idx = N.nearest_index(x, levels, ties_to_even=True)
    distance = (x[:, None] - levels[None, :]).abs()
    assert torch.equal(distance.gather(1, idx[:, None]).squeeze(1), distance.min(1).values)


def test_ties_go_to_the_even_index_in_the_8_bit_map_and_down_in_nf4():
    mids = (N.DYNAMIC_MAP[:-1] + N.DYNAMIC_MAP[1:]) / 2
    idx = N.nearest_index(mids, N.DYNAMIC_MAP, ties_to_even=True)
    below = torch.arange(255)
    assert torch.equal(idx, torch.where(below % 2 == 0, below, below + 1))
    nf4_mids = (N.NF4_CODE[:-1] + N.NF4_CODE[1:]) / 2
    assert torch.equal(N.nearest_index(nf4_mids, N.NF4_CODE, ties_to_even=False), torch.arange(15))


@pytest.mark.parametrize("n", [2, 100, 256, 700, 1024])
def test_double_quantized_absmax_is_the_nearest_map_value(n):
    """c' = map[i] * s + m with i the nearest map value of (c - m) / s, per block of 256 constants."""
    c = _absmax(n)
    codes, scale, mean = N._double_quantize(c)
    assert codes.dtype == torch.uint8 and codes.shape == (n,)
    assert scale.shape == (-(-n // 256),) and mean.shape == ()
    torch.testing.assert_close(mean, c.mean())
    centred = c - mean
    for b in range(scale.numel()):
        part = centred[256 * b: 256 * (b + 1)]
        assert scale[b] == part.abs().max()
        brute = (part[:, None] / scale[b] - N.DYNAMIC_MAP[None, :]).abs().argmin(1)
        assert torch.equal(codes[256 * b: 256 * (b + 1)].long(), brute)


def test_double_quant_error_is_small_and_storage_is_8_bit():
    w = torch.randn(512, 256, generator=torch.Generator().manual_seed(3))
    plain, double = N.nf4_quantize(w), N.nf4_quantize(w, double_quant=True)
    assert set(double.tensors()) == {"packed", "absmax_codes", "absmax_scale", "absmax_mean"}
    assert double.absmax_codes.dtype == torch.uint8 and double.absmax_scale.dtype == torch.float32
    assert torch.equal(double.packed, plain.packed)  # the 4-bit codes use the exact absmax
    # Each constant moves by at most half the widest gap of the map times its block's scale.
    half_gap = (N.DYNAMIC_MAP[1:] - N.DYNAMIC_MAP[:-1]).max() / 2
    bound = half_gap * double.absmax_scale.repeat_interleave(256)[: plain.absmax.numel()]
    assert torch.all((N._absmax_of(double) - plain.absmax).abs() <= bound * (1 + 1e-5))
    err_plain = (N.nf4_dequantize(plain) - w).pow(2).mean()
    assert (N.nf4_dequantize(double) - w).pow(2).mean() < 1.001 * err_plain


@pytest.mark.parametrize("w", [torch.zeros(4, 64), torch.full((8, 128), 0.5), torch.zeros(3, 100)])
def test_degenerate_tensors_round_trip_without_nan(w):
    out = N.nf4_dequantize(N.nf4_quantize(w, double_quant=True))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, w, rtol=1e-6, atol=0)


def test_a_single_block_keeps_its_exact_absmax():
    """One constant is its own mean: it is stored exactly, so double quantization changes nothing."""
    w = torch.randn(1, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(N.nf4_dequantize(N.nf4_quantize(w, double_quant=True)), N.nf4_dequantize(N.nf4_quantize(w)))


def test_old_int8_absmax_codes_are_refused():
    t = N.nf4_quantize(torch.randn(4, 64), double_quant=True)
    t.absmax_codes = t.absmax_codes.to(torch.int8)
    with pytest.raises(ValueError, match="uint8 indices into the dynamic map"):
        N.nf4_dequantize(t)


def test_qlora_defaults_to_double_quant_and_its_layer_stores_it():
    config = qaft.config_for("qlora", rank=4)
    assert config.double_quant is True
    assert qaft.config_for("loftq").double_quant is False
    linear = torch.nn.Linear(192, 48)
    layer = config.make_layer(linear)
    buffers = dict(layer.named_buffers())
    assert buffers["nf4_absmax_codes"].dtype == torch.uint8 and "nf4_absmax" not in buffers
    expected = N.nf4_dequantize(N.nf4_quantize(linear.weight.detach(), double_quant=True))
    assert torch.equal(layer.dequantized_base(), expected)
    clone = config.make_layer(torch.nn.Linear(192, 48))
    clone.load_state_dict(layer.state_dict())
    assert torch.equal(clone.dequantized_base(), expected)

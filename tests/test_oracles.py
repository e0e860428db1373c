"""qaft's quantizers against independent implementations: torchao (affine) and bitsandbytes (NF4)."""
import pytest
import torch

import qaft.quant as Q

torchao_qp = pytest.importorskip("torchao.quantization.quant_primitives")
bnb_functional = pytest.importorskip("bitsandbytes.functional")


def _w(seed, shape=(48, 256)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("seed", [0, 1])
def test_asymmetric_quantizer_equals_torchao_float_zero_point(bits, group_size, seed):
    """torchao's tinygemm quantizer keeps a float zero (offset) per group: the same family as qaft's."""
    w = _w(seed)
    s, b = Q.init_scale_offset(w, bits, group_size, "minmax")
    block = (1, w.shape[1] if group_size == -1 else group_size)
    qmax = 2**bits - 1
    unsigned = torchao_qp._quantize_affine_tinygemm(w, block, s, b, torch.uint8, 0, qmax)
    q = Q.quantize(w, s, b, bits)
    assert torch.equal(unsigned.to(torch.int16) - 2 ** (bits - 1), q.to(torch.int16))
    deq = torchao_qp._dequantize_affine_tinygemm(unsigned, block, s, b, torch.uint8, 0, qmax)
    torch.testing.assert_close(deq, Q.dequantize(q, s, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [64, -1])
def test_symmetric_quantizer_equals_torchao_integer_affine(bits, group_size):
    w = _w(2)
    s, b = Q.init_scale_offset(w, bits, group_size, "l4q")
    block = (1, w.shape[1] if group_size == -1 else group_size)
    qn, qp = Q.qrange(bits)
    zero = torch.zeros_like(s, dtype=torch.int32)
    codes = torchao_qp.quantize_affine(w, block, s, zero, torch.int8, qn, qp)
    assert torch.equal(codes, Q.quantize(w, s, b, bits))
    deq = torchao_qp.dequantize_affine(codes, block, s, zero, torch.int8, qn, qp)
    torch.testing.assert_close(deq, Q.dequantize(codes, s, b), rtol=0, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("shape", [(64, 128), (96, 576), (3, 64)])
def test_nf4_equals_bitsandbytes(seed, shape):
    w = _w(seed, shape)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4")
    expected = bnb_functional.dequantize_4bit(packed, state)
    ours = Q.nf4_dequantize(Q.nf4_quantize(w))
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    # Storage agrees too: bitsandbytes packs two codes per byte, high nibble first, like qaft.
    assert torch.equal(Q.nf4_quantize(w).packed, packed.flatten()[: w.numel() // 2])


def test_nf4_double_quant_close_to_bitsandbytes():
    """Double quantization: qaft stores the constants as linear int8, bitsandbytes with its dynamic map."""
    w = _w(4, (256, 512))
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    expected = bnb_functional.dequantize_4bit(packed, state)
    plain = Q.nf4_dequantize(Q.nf4_quantize(w))
    ours = Q.nf4_dequantize(Q.nf4_quantize(w, double_quant=True))
    assert (ours - plain).abs().max() < 0.02 * w.abs().max()
    assert (ours - expected).abs().max() < 0.02 * w.abs().max()
    assert (ours - w).pow(2).mean() < 1.01 * (plain - w).pow(2).mean()

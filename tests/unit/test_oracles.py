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


# Shapes whose count of 64-blocks is below, not a multiple of, and a multiple of the 256 of a DQ block.
DQ_SHAPES = [(3, 64), (64, 128), (96, 576), (1000, 448), (256, 1024)]
# bitsandbytes' backend-neutral PyTorch kernels (its "default" backend): nearest map value at float32
# midpoints, the rule of its CUDA kernel. Its native CPU 8-bit kernel uses a 65536-entry lookup table instead.
REFERENCE_KERNEL = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)


def _dq_weights(kind, shape, seed=0):
    if kind == "gaussian":
        return _w(seed, shape)
    g = torch.Generator().manual_seed(seed)  # Student-t with 2 degrees of freedom: normal / sqrt(chi2_2 / 2)
    chi2 = -2 * torch.rand(*shape, generator=g).clamp_min(1e-12).log()
    return torch.randn(*shape, generator=g) / (chi2 / 2).sqrt()


def _bnb_double_quant(w, monkeypatch=None):
    """bitsandbytes' NF4 with compress_statistics=True; with ``monkeypatch``, its nested 8-bit step runs on the
    reference kernel (the rest of quantize_4bit, the mean offset and the state, stay bitsandbytes' own)."""
    if monkeypatch is not None:
        original = bnb_functional.quantize_blockwise

        def reference(A, code=None, absmax=None, out=None, blocksize=4096, nested=False):
            _, state = original(A, code=code, blocksize=blocksize, nested=nested)
            codes, state.absmax = torch.ops.bitsandbytes.quantize_blockwise.default.redispatch(
                REFERENCE_KERNEL, A, state.code, blocksize)
            return codes, state

        monkeypatch.setattr(bnb_functional, "quantize_blockwise", reference)
    packed, state = bnb_functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
    return packed, state, bnb_functional.dequantize_4bit(packed, state)


def test_dynamic_map_equals_bitsandbytes():
    expected = bnb_functional.create_dynamic_map(signed=True)
    assert torch.equal(Q.nf4.dynamic_map(), expected)
    assert torch.equal(Q.nf4.DYNAMIC_MAP, expected)


def test_nf4_levels_are_bitsandbytes_floats():
    assert torch.equal(Q.nf4.NF4_CODE, bnb_functional.get_4bit_type("nf4", device="cpu"))


@pytest.mark.parametrize("kind", ["gaussian", "student_t2"])
@pytest.mark.parametrize("shape", DQ_SHAPES)
def test_nf4_double_quant_equals_bitsandbytes(kind, shape, monkeypatch):
    """Bit for bit: 4-bit codes, 8-bit absmax codes, the per-256 scales, the mean offset, the weights."""
    w = _dq_weights(kind, shape)
    packed, state, expected = _bnb_double_quant(w, monkeypatch)
    t = Q.nf4_quantize(w, double_quant=True)
    assert torch.equal(t.packed, packed.flatten()[: w.numel() // 2])
    assert t.absmax_codes.dtype == state.absmax.dtype == torch.uint8
    assert torch.equal(t.absmax_codes, state.absmax)
    assert torch.equal(t.absmax_scale, state.state2.absmax)
    assert t.absmax_scale.numel() == -(-(w.numel() // 64) // 256)
    assert torch.equal(t.absmax_mean, state.offset)
    assert torch.equal(Q.nf4_dequantize(t), expected)


@pytest.mark.parametrize("kind", ["gaussian", "student_t2"])
def test_nf4_double_quant_against_bitsandbytes_cpu_kernel(kind):
    """bitsandbytes' native CPU kernel picks a table entry, not always the nearest map value: where its
    absmax code differs from qaft's, qaft's map value is the nearer one, and every other block is identical."""
    w = _dq_weights(kind, (1000, 448))
    packed, state, expected = _bnb_double_quant(w)
    t = Q.nf4_quantize(w, double_quant=True)
    assert torch.equal(t.absmax_scale, state.state2.absmax) and torch.equal(t.absmax_mean, state.offset)
    differ = t.absmax_codes != state.absmax
    assert 0 < differ.sum() < 0.01 * differ.numel()
    plain = Q.nf4_quantize(w).absmax
    blocks = torch.nn.functional.pad(plain - t.absmax_mean, (0, (-plain.numel()) % 256)).view(-1, 256)
    x = (blocks * (1.0 / t.absmax_scale)[:, None]).flatten()[: plain.numel()]
    levels = Q.nf4.DYNAMIC_MAP
    ours, theirs = (x - levels[t.absmax_codes.long()]).abs(), (x - levels[state.absmax.long()]).abs()
    assert torch.all(ours[differ] < theirs[differ])
    same = ~differ.repeat_interleave(64).view(w.shape)
    assert torch.equal(Q.nf4_dequantize(t)[same], expected[same])

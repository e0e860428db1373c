"""The memory-optimised backward of L4Q / DL-QAT equals autograd of the naive formula (float64), on CPU and CUDA;
it and the frozen-base product also run under bf16 autocast and gradient checkpointing (a GPU run's settings)."""
import pytest
import torch

from qaft.methods import lowrank_qat
from qaft.methods.lowrank_qat import lowrank_fake_quant_linear
from qaft.quant import init_scale_offset
from qaft.quant.affine import offset_of_zero
from qaft.quant.init import init_scale_zero

from helpers import DEVICES


def _inputs(out=24, inp=64, rank=4, group=16, bits=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    f64 = dict(dtype=torch.float64)
    w0 = torch.randn(out, inp, generator=g, **f64)
    a = torch.randn(rank, inp, generator=g, **f64) * 0.3
    b = torch.randn(out, rank, generator=g, **f64) * 0.3  # non-zero B: W' differs from W0
    s, off = init_scale_offset(w0, bits, group)
    m = 1 + 0.1 * torch.randn(s.shape, generator=g, **f64)
    x = torch.randn(2, 5, inp, generator=g, **f64)
    return x, w0, a, b, s * 0.9, off, m  # a tighter range makes some values clip


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("with_m", [False, True])
@pytest.mark.parametrize("grad_scale", [1.0, 0.1])
@pytest.mark.parametrize("block_elements", [1 << 20, 64 * 5])  # one block, or blocks of 5 rows
@pytest.mark.parametrize("device", DEVICES)
def test_custom_backward_equals_autograd(bits, with_m, grad_scale, block_elements, device, monkeypatch):
    monkeypatch.setattr(lowrank_qat, "BLOCK_ELEMENTS", block_elements)
    x, w0, a, b, s, off, m = (t.to(device) for t in _inputs(bits=bits))
    m = m if with_m else None
    grad_out = torch.randn(2, 5, w0.shape[0], dtype=torch.float64).to(device)
    results = []
    for efficient in (True, False):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, a, b, s, off, m)]
        lx, la, lb, ls, loff, lm = leaves
        y = lowrank_fake_quant_linear(lx, w0, la, lb, ls, loff, lm, 0.5, bits, grad_scale, efficient)
        (y * grad_out).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves if t is not None])
    for custom, reference in zip(*results):
        torch.testing.assert_close(custom, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("with_m", [False, True])
@pytest.mark.parametrize("grad_scale", [1.0, 0.1])
@pytest.mark.parametrize("block_elements", [1 << 20, 64 * 5])
@pytest.mark.parametrize("device", DEVICES)
def test_int_zero_point_backward_equals_autograd(bits, with_m, grad_scale, block_elements, device, monkeypatch):
    """``zero_point="int"``: ``b = s (2^(n-1) - round(z))`` (straight-through round) feeds the custom function;
    the reference is plain autograd of the whole naive formula, the round written as ``z + (z_int - z).detach()``."""
    monkeypatch.setattr(lowrank_qat, "BLOCK_ELEMENTS", block_elements)
    x, w0, a, b, s, _, m = (t.to(device) for t in _inputs(bits=bits))
    _, z = init_scale_zero(w0, bits, 16)
    z = z + 0.4 * torch.randn(z.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    m = m if with_m else None
    grad_out = torch.randn(2, 5, w0.shape[0], dtype=torch.float64).to(device)
    half = 2 ** (bits - 1)
    results = []
    for efficient in (True, False):
        leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, a, b, s, z, m)]
        lx, la, lb, ls, lz, lm = leaves
        z_int = lz.round().clamp(0, 2**bits - 1)
        off = offset_of_zero(ls, lz, bits) if efficient else ls * (half - (lz + (z_int - lz).detach()))
        y = lowrank_fake_quant_linear(lx, w0, la, lb, ls, off, lm, 0.5, bits, grad_scale, efficient)
        (y * grad_out).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves if t is not None])
    for custom, reference in zip(*results):
        torch.testing.assert_close(custom, reference, rtol=1e-10, atol=1e-10)
    assert results[0][5].abs().sum() > 0  # z got a gradient (some values clip)


@pytest.mark.parametrize("with_m", [False, True])
@pytest.mark.parametrize("trains", ["all", "lora_and_m", "quantizer"])  # L4Q / DL-QAT phase 2 / phase 1
def test_compiled_backward_equals_eager(with_m, trains):
    """The torch.compile path (pure formula) gives the eager custom backward's gradients and the same forward."""
    x, w0, a, b, s, off, m = (t.float() for t in _inputs(bits=4))
    m = m if with_m else None
    wanted = {"all": (True,) * 6, "lora_and_m": (True, True, True, False, False, True),
              "quantizer": (False, False, False, True, True, False)}[trains]
    grad_out = torch.randn(2, 5, w0.shape[0])
    results = []
    for compiled in (False, True):
        leaves = [None if t is None else t.clone().requires_grad_(want)
                  for t, want in zip((x, a, b, s, off, m), wanted)]
        y = lowrank_fake_quant_linear(leaves[0], w0, *leaves[1:5], leaves[5], 0.5, 4, compiled=compiled)
        (y * grad_out).sum().backward()
        results.append([y.detach()] + [t.grad for t in leaves if t is not None and t.requires_grad])
    assert lowrank_qat._COMPILED["fn"] is not None  # compiled, not the eager fallback
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    for fused, eager in zip(results[1][1:], results[0][1:]):
        torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-5)


def test_frozen_inputs_get_no_gradient():
    x, w0, a, b, s, off, m = _inputs()
    s_, off_ = s.clone().requires_grad_(), off.clone().requires_grad_()
    y = lowrank_fake_quant_linear(x, w0, a, b, s_, off_, None, 1.0, 4)  # DL-QAT phase 1: only s, b
    y.sum().backward()
    assert s_.grad is not None and off_.grad is not None
    assert a.grad is None and b.grad is None and x.grad is None


def test_no_weight_sized_tensor_is_saved_for_backward():
    """Only x, W0 (held by the layer anyway) and the small tensors are kept between forward and backward."""
    x, w0, a, b, s, off, m = (t.float() for t in _inputs(out=256, inp=512, group=64))
    leaves = [t.requires_grad_() for t in (x, a, b, s, off, m)]
    lx, la, lb, ls, loff, lm = leaves
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = lowrank_fake_quant_linear(lx, w0, la, lb, ls, loff, lm, 1.0, 4)
    weight_sized = [t for t in saved if t.numel() >= w0.numel()]
    assert all(t.data_ptr() == w0.data_ptr() for t in weight_sized), [t.shape for t in weight_sized]
    y.sum().backward()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        saved.clear()
        lowrank_fake_quant_linear(lx, w0, la, lb, ls, loff, lm, 1.0, 4, memory_efficient=False)
    assert sum(t.numel() >= w0.numel() for t in saved) >= 3  # naive autograd keeps W', v, Wq alive


@pytest.mark.parametrize("device", DEVICES)
def test_custom_backward_runs_under_bf16_autocast(device):
    """bf16-mixed training (the pipeline's default on a GPU): the forward's GEMMs run in bf16 under autocast, so
    the gradient arrives in bf16 beside a float32 input; the custom backward agrees with autograd's to bf16 (in
    norm: the naive path forms ``B A`` in bf16 too, which moves the odd code across a rounding tie)."""
    x, w0, a, b, s, off, _ = (t.float().to(device) for t in _inputs(bits=4))
    grad_out = torch.randn(2, 5, w0.shape[0]).to(device)
    results = []
    for efficient in (True, False):
        leaves = [t.clone().requires_grad_() for t in (x, a, b, s, off)]
        lx, la, lb, ls, loff = leaves
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
            y = lowrank_fake_quant_linear(lx, w0, la, lb, ls, loff, None, 0.5, 4, 1.0, efficient)
        (y.float() * grad_out).sum().backward()
        results.append([t.grad for t in leaves])
    for custom, reference in zip(*results):
        assert custom.dtype == torch.float32
        assert (custom - reference).norm() <= 2e-2 * reference.norm()


@pytest.mark.parametrize("device", DEVICES)
def test_effective_weight_stays_float32_under_bf16_autocast(device):
    """The codes of the training forward are the merge's under bf16-mixed too: ``W0 + alpha B A`` is not rounded to
    bf16 by autocast (which would move codes at rounding ties: 0.3% of the logits on the tiny LLaMA, measured)."""
    _, w0, a, b, *_ = (t.float().to(device) for t in _inputs(bits=4))
    rows = slice(0, w0.shape[0])
    plain = lowrank_qat.effective_weight(w0, a, b, 0.5, rows)
    with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
        mixed = lowrank_qat.effective_weight(w0, a, b, 0.5, rows)
    assert mixed.dtype == torch.float32 and torch.equal(mixed, plain)


@pytest.mark.parametrize("device", DEVICES)
def test_recomputed_base_runs_under_non_reentrant_gradient_checkpointing(device):
    """The other custom backward, QLoRA / QA-LoRA / LoftQ's frozen-base product, under transformers' gradient
    checkpointing (non-reentrant: each saved tensor may be unpacked once): the gradient without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from qaft.methods.layer import recomputed_linear

    w0 = torch.randn(24, 64, generator=torch.Generator().manual_seed(0)).to(device)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1)).to(device)
    grads = []
    for checkpointed in (False, True):
        xv = x.clone().requires_grad_()
        y = checkpoint(recomputed_linear, xv, torch.tanh, w0, use_reentrant=False) if checkpointed \
            else recomputed_linear(xv, torch.tanh, w0)
        y.square().sum().backward()
        grads.append(xv.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)

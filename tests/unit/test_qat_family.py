"""PEQA and LR-QAT (METHODS.md, "The QAT family around the seeds"): custom backward == autograd of the naive
formula, forward == an independent float64 formula, and a few training steps move only what should train.
(Merge == trained bit for bit, save / load, phases: the shared method matrix.)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import qaft
from qaft.methods.lr_qat import lr_qat_linear
from qaft.methods.peqa import scale_only_linear
from qaft.quant.affine import qrange

from helpers import tiny_llama, token_batch
from method_matrix import applied


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _grads(fn, *tensors):
    leaves = [t.clone().requires_grad_() for t in tensors]
    out = fn(*leaves)
    (out * torch.randn(out.shape, generator=_gen(9), dtype=out.dtype)).sum().backward()
    return [out.detach()] + [leaf.grad for leaf in leaves]


@pytest.mark.parametrize("grad_scale", [1.0, 0.1])
def test_peqa_backward_equals_autograd_of_the_naive_formula(grad_scale):
    gen = _gen()
    codes = torch.randint(-8, 8, (12, 64), generator=gen, dtype=torch.int8)
    s = torch.rand(12, 2, generator=gen, dtype=torch.float64) + 0.1
    b = torch.randn(12, 2, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 5, 64, generator=gen, dtype=torch.float64)

    def naive(x, s, b):
        s, b = (t * grad_scale + (t - t * grad_scale).detach() for t in (s, b))  # LSQ's gradient scale
        w = (s[..., None] * codes.double().reshape(12, 2, 32) + b[..., None]).reshape(12, 64)
        return x @ w.T

    custom = _grads(lambda x, s, b: scale_only_linear(x, codes, s, b, grad_scale), x, s, b)
    for got, want in zip(custom, _grads(naive, x, s, b)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bits, asymmetric, grad_scale", [(2, False, 1.0), (4, False, 1.0), (8, False, 1.0),
                                                          (2, True, 1.0), (4, True, 0.1), (8, True, 1.0)])
def test_lr_qat_backward_equals_autograd_of_the_naive_formula(bits, asymmetric, grad_scale):
    gen = _gen(bits)
    qn, qp = qrange(bits)
    phi = torch.empty(16, 64, dtype=torch.float64).uniform_(qn - 1.5, qp + 1.5, generator=gen)  # some clip
    a = torch.randn(4, 64, generator=gen, dtype=torch.float64)
    b = torch.randn(16, 4, generator=gen, dtype=torch.float64) * 0.3
    s = torch.rand(16, 2, generator=gen, dtype=torch.float64) + 0.1
    off = torch.randn(16, 2, generator=gen, dtype=torch.float64) * asymmetric
    x = torch.randn(2, 3, 64, generator=gen, dtype=torch.float64)
    grads = [_grads(lambda x, a, b, s, off, fast=fast: lr_qat_linear(x, phi, a, b, s, off, 0.7, bits, fast,
                                                                      grad_scale),
                    x, a, b, s, off) for fast in (True, False)]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert grads[0][2].abs().sum() > 0 and grads[0][3].abs().sum() > 0  # the adapter gets gradient


def _float64_peqa(w, x, bits, group, s):
    """PEQA's forward from scratch: min-max codes of ``w`` per group, then ``s (q) + b`` with the given ``s``."""
    qn, qp = qrange(bits)
    wg = w.reshape(w.shape[0], -1, group)
    lo, hi = wg.min(-1), wg.max(-1)
    s0 = (hi - lo) / (2**bits - 1)
    b = (2 ** (bits - 1) * hi + (2 ** (bits - 1) - 1) * lo) / (2**bits - 1)
    q = np.clip(np.round((wg - b[..., None]) / s0[..., None]), qn, qp)
    return x @ (s[..., None] * q + b[..., None]).reshape(w.shape).T


def test_peqa_forward_equals_an_independent_float64_formula():
    model, _ = _train(applied("peqa"), steps=3)
    layer = qaft.methods.api.qaft_layers(model)[0]
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().double().numpy()
    x = torch.randn(4, 64, generator=_gen(3))
    want = _float64_peqa(w, x.double().numpy(), 4, 32, layer.quantizer.scale.detach().double().numpy())
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).double().numpy(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("downcast", ["fixed8", "bf16"])
def test_lr_qat_forward_equals_an_independent_float64_formula(downcast):
    model, _ = _train(applied("lr_qat", symmetric=True, downcast=downcast), steps=3)
    layer = qaft.methods.api.qaft_layers(model)[0]
    w = tiny_llama().model.layers[0].self_attn.q_proj.weight.detach().double().numpy()
    bits, (qn, qp) = 4, qrange(4)
    wg = w.reshape(w.shape[0], -1, 32)
    s0 = np.maximum(np.abs(wg.min(-1) / qn), np.abs(wg.max(-1) / qp))  # symmetric min-max
    x0 = wg / s0[..., None]
    if downcast == "fixed8":
        phi = np.round(np.clip(x0, qn, qp) * 2 ** (8 - bits)) / 2 ** (8 - bits)
    else:  # bf16: float32, then the top 16 bits, rounded to nearest even
        phi = torch.tensor(x0, dtype=torch.float32).to(torch.bfloat16).double().numpy()
    a, b = (t.detach().double().numpy() for t in (layer.lora_A, layer.lora_B))
    c = (layer.config.alpha / layer.config.rank) * (b @ a)
    q = np.clip(np.round(phi + c.reshape(phi.shape)), qn, qp)
    wq = (layer.quantizer.scale.detach().double().numpy()[..., None] * q).reshape(w.shape)
    x = torch.randn(4, 64, generator=_gen(4))
    assert np.abs(c).max() > 0.01  # the adapter trained and moves codes
    with torch.no_grad():
        np.testing.assert_allclose(layer(x).double().numpy(), x.double().numpy() @ wq.T, rtol=1e-5, atol=1e-5)


def _train(model, steps=4, lr=1e-2):
    params = [p for group in qaft.parameter_groups(model).values() for p in group]
    opt = torch.optim.AdamW(params, lr=lr)
    ids = token_batch()
    model.train()
    for step in range(steps):
        qaft.set_training_step(model, step)
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval(), params


def _changed(before, after):
    return {name for name, t in after.items() if not torch.equal(t, before[name])}


@pytest.mark.parametrize("zero_point", ["float", "int"])
def test_peqa_training_moves_only_the_scales(zero_point):
    model = applied("peqa", zero_point=zero_point)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    changed = _changed(before, model.state_dict())
    assert changed and all(name.endswith("quantizer.scale") for name in changed)
    assert len(changed) == 14  # every layer's scales moved
    layer = qaft.methods.api.qaft_layers(model)[0]
    if zero_point == "int":  # z frozen, so b = s (2^(n-1) - z) moved with s
        q = layer.quantizer
        ratio = (q.current_offset() / q.scale).detach()
        torch.testing.assert_close(ratio, 8 - q.zero, rtol=1e-6, atol=1e-6)


def test_lr_qat_training_moves_only_the_adapter_and_the_scales():
    model = applied("lr_qat", symmetric=True)
    layer = qaft.methods.api.qaft_layers(model)[0]
    assert layer.phi.dtype == torch.int8 and not hasattr(layer, "weight")  # W0 is not kept, only phi(W0 / s0)
    assert int(layer.phi.max()) <= 7 * 16 and int(layer.phi.min()) >= -8 * 16
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _train(model)
    changed = {name.rsplit(".", 2)[-2] + "." + name.rsplit(".", 1)[-1] if "quantizer" in name
               else name.rsplit(".", 1)[-1] for name in _changed(before, model.state_dict())}
    assert changed == {"lora_A", "lora_B", "quantizer.scale"}
    ids = token_batch(seed=8)  # the symmetric default merges bit for bit too (the shared matrix runs asymmetric)
    with torch.no_grad():
        torch.testing.assert_close(qaft.merge_model(model)(ids).logits, model(ids).logits, rtol=0, atol=0)


def test_peqa_on_a_gptq_base_takes_its_codes_and_merges_exactly():
    calib = [token_batch(seed=1, length=16)]
    fields = {"group_size": 32, "calib_batches": 1, "zero_point": "int"}
    gptq = qaft.apply_method(tiny_llama(), qaft.config_for("ptq", algorithm="gptq", **fields), calib_batches=calib)
    peqa = qaft.apply_method(tiny_llama(), qaft.config_for("peqa", base_quant="gptq", **fields), calib_batches=calib)
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(peqa(ids).logits, gptq(ids).logits, rtol=1e-6, atol=1e-6)
    _train(peqa, steps=2)
    with torch.no_grad():
        torch.testing.assert_close(qaft.merge_model(peqa)(ids).logits, peqa(ids).logits, rtol=0, atol=0)


def test_lr_qat_rejects_an_unknown_downcast():
    with pytest.raises(ValueError, match=r"downcast must be one of \['fixed8', 'bf16', 'fp16', 'fp32'\]"):
        qaft.config_for("lr_qat", downcast="int4")


# --- OmniQuant's learnable weight clipping: init="omniquant_lwc" ------------------------------------------------

def _calib():
    return [token_batch(seed=1, length=16)]


def test_lwc_init_is_minmax_of_the_clipped_range_in_float64():
    from qaft.quant.init import clipping, init_scale_offset

    w = torch.randn(6, 64, generator=_gen(1), dtype=torch.float64)
    lo, hi = (torch.rand(6, 2, generator=_gen(seed), dtype=torch.float64) for seed in (2, 3))
    with clipping((lo, hi)):
        s, b = init_scale_offset(w, 3, 32, "omniquant_lwc")
    wg = w.numpy().reshape(6, 2, 32)
    mn, mx = wg.min(-1) * lo.numpy(), wg.max(-1) * hi.numpy()
    np.testing.assert_allclose(s.numpy(), (mx - mn) / 7, rtol=1e-12)
    np.testing.assert_allclose(b.numpy(), (4 * mx + 3 * mn) / 7, rtol=1e-12)
    with pytest.raises(ValueError, match="learnt on calibration data"):
        init_scale_offset(w, 3, 32, "omniquant_lwc")


def test_lwc_lowers_the_block_reconstruction_error():
    from qaft.methods.lwc import fit_clipping

    config = qaft.config_for("ptq", group_size=32, init="omniquant_lwc", calib_batches=2)
    assert config.calibration_options().calib_batches == 2
    model = tiny_llama()
    names = [n for n, m in model.named_modules() if n.endswith(("q_proj", "down_proj"))]
    ratios, history = fit_clipping(model, config, _calib(), names, epochs=4)
    assert set(ratios) == set(names) and all(h[-1] < h[0] for h in history)  # each block's loss fell
    assert all(bool((r < 1).all()) for pair in ratios.values() for r in pair)  # sigmoid: the range only shrinks


def test_lwc_starts_every_integer_method_at_its_ptq_point(monkeypatch):
    monkeypatch.setattr("qaft.methods.lwc.EPOCHS", 1)
    fields = {"group_size": 32, "init": "omniquant_lwc"}
    ptq = qaft.apply_method(tiny_llama(), qaft.config_for("ptq", **fields), calib_batches=_calib())
    l4q = qaft.apply_method(tiny_llama(), qaft.config_for("l4q", **fields), calib_batches=_calib())
    ids = token_batch(seed=6)
    with torch.no_grad():  # the trained method starts exactly at the LWC PTQ point
        torch.testing.assert_close(l4q(ids).logits, ptq(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("symmetric, zero_point", [(False, "float"), (False, "int"), (True, "float")])
def test_lwc_training_range_is_the_init_it_fixes(symmetric, zero_point):
    """What the fit trains (differentiable in gamma, beta) is, to the init's ulp containment, what the init then
    fits from the learnt ratios; and the gradient reaches both strengths."""
    from qaft.methods.lwc import clipped_scale_offset
    from qaft.quant.init import clipping, init_scale_offset

    w = torch.randn(8, 64, generator=_gen(5))
    gamma, beta = (torch.randn(8, 2, generator=_gen(seed)).requires_grad_() for seed in (6, 7))
    s, b = clipped_scale_offset(w, gamma, beta, 3, symmetric, zero_point == "int")
    ((s - 0.1).pow(2).sum() + (b - 0.05).pow(2).sum()).backward()
    assert gamma.grad.abs().sum() > 0 and (symmetric or beta.grad.abs().sum() > 0)
    with clipping((torch.sigmoid(beta).detach(), torch.sigmoid(gamma).detach())):
        s0, b0 = init_scale_offset(w, 3, 32, "omniquant_lwc", symmetric, zero_point=zero_point)
    torch.testing.assert_close(s0, s.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(b0, b.detach(), rtol=1e-6, atol=1e-7)


def test_lwc_needs_data_and_refuses_a_base_that_fits_its_own_range():
    with pytest.raises(ValueError, match="needs calibration data"):
        qaft.apply_method(tiny_llama(), qaft.config_for("peqa", init="omniquant_lwc"))
    with pytest.raises(ValueError, match="init='omniquant_lwc' learns the ranges of a round-to-nearest base; gptq"):
        qaft.config_for("ptq", algorithm="gptq", init="omniquant_lwc")

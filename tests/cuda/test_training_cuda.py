"""Training on CUDA: every method's merge equals its trained model under bf16 autocast (what
``trainer.precision=bf16-mixed`` runs), NF4 on the GPU equals NF4 on the CPU, and the custom backwards the unit
tests do not already run on CUDA (through ``helpers.DEVICES``) equal autograd of their naive formula there."""
import pytest
import torch

import qaft
from qaft.methods.layer import recomputed_linear
from qaft.methods.llm_qat import _AbsmaxSTE, absmax_scale
from qaft.quant import nf4 as N
from qaft.quant.activation import fake_quantize_per_token

from helpers import token_batch, train_steps
from method_matrix import applied, methods

pytestmark = pytest.mark.cuda


def _train_bf16(model, device, steps=4, lr=1e-2):
    """A few AdamW steps with float32 master weights under bf16 autocast, as Lightning's bf16-mixed."""
    return train_steps(model, token_batch().to(device), steps, lr, autocast=torch.bfloat16)


@pytest.mark.parametrize("name", methods())
def test_merge_equals_the_model_trained_in_bf16(name, device):
    model = _train_bf16(applied(name).to(device), device)
    ids = token_batch(seed=7).to(device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        trained = model(ids).logits.float()
        merged = qaft.merge_model(model)(ids).logits.float()  # the merge itself computes in float32
    assert torch.isfinite(trained).all()
    # Both forwards round to bf16 along different paths (x Q(W + BA) vs x W_int); an exact merge differs by that
    # rounding only. A merge off by one quantization step in any weight group moves logits far more.
    torch.testing.assert_close(merged, trained, rtol=0, atol=3e-2 * trained.abs().max().item())


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_on_cuda_equals_nf4_on_cpu(double_quant, device):
    w = torch.randn(96, 320, generator=torch.Generator().manual_seed(0))  # 30720 values: a ragged last block
    cpu = N.nf4_quantize(w, double_quant=double_quant)
    gpu = N.nf4_quantize(w.to(device), double_quant=double_quant)
    for name, tensor in cpu.tensors().items():
        torch.testing.assert_close(gpu.tensors()[name].cpu(), tensor, rtol=0, atol=0, msg=name)
    torch.testing.assert_close(N.nf4_dequantize(gpu).cpu(), N.nf4_dequantize(cpu), rtol=0, atol=0)


def test_qlora_layer_forward_and_backward_on_cuda_equal_cpu(device):
    config = qaft.config_for("qlora", rank=4)
    torch.manual_seed(0)
    layer = config.make_layer(torch.nn.Linear(192, 48))
    with torch.no_grad():
        layer.lora_B.normal_()  # a non-zero adapter, so both of its gradients are non-trivial
    x = torch.randn(3, 5, 192)
    grads = []
    for where in ("cpu", device):
        moved = layer.to(where)
        xv = x.to(where).requires_grad_()
        moved(xv).square().sum().backward()
        grads.append([t.detach().cpu() for t in (xv.grad, moved.lora_A.grad, moved.lora_B.grad)])
        moved.zero_grad(set_to_none=True)
    for gpu, cpu in zip(grads[1], grads[0]):
        torch.testing.assert_close(gpu, cpu, rtol=1e-3, atol=1e-4)


def test_recomputed_linear_backward_equals_autograd(device):
    """The frozen-base product of QLoRA / QA-LoRA / LoftQ / L4Q's warm-up: rebuilds W in backward."""
    g = torch.Generator().manual_seed(0)
    w0, x = (torch.randn(*s, generator=g, dtype=torch.float64).to(device) for s in ((24, 64), (2, 5, 64)))
    grad = torch.randn(2, 5, 24, generator=g, dtype=torch.float64).to(device)
    outs = []
    for custom in (True, False):
        xv = x.clone().requires_grad_()
        y = recomputed_linear(xv, torch.tanh, w0) if custom else xv @ torch.tanh(w0).T
        (y * grad).sum().backward()
        outs.append((y.detach(), xv.grad))
    for custom, reference in zip(*outs):
        torch.testing.assert_close(custom, reference, rtol=1e-12, atol=1e-12)


def test_straight_through_estimators_equal_autograd_of_their_naive_formula(device):
    """LLM-QAT's absmax quantizer and the per-token activation quantizer: the exact forward, and the gradient
    of the textbook ``v + (q(v) - v).detach()``."""
    g = torch.Generator().manual_seed(1)
    w, x = (torch.randn(*s, generator=g).to(device) for s in ((16, 128), (4, 7, 128)))
    grad_w, grad_x = torch.randn_like(w), torch.randn_like(x)
    for fn, v, up in ((lambda t: _AbsmaxSTE.apply(t, absmax_scale(t, 4, 4), 4), w, grad_w),
                      (lambda t: fake_quantize_per_token(t, 8), x, grad_x)):
        custom, naive = v.clone().requires_grad_(), v.clone().requires_grad_()
        out = fn(custom)
        (out * up).sum().backward()
        ref = naive + (fn(naive.detach()) - naive).detach()
        (ref * up).sum().backward()
        torch.testing.assert_close(out.detach(), ref.detach(), rtol=0, atol=0)
        torch.testing.assert_close(custom.grad, naive.grad, rtol=0, atol=0)

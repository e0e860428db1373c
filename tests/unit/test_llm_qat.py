"""LLM-QAT: the weight quantizer against an independent formula, the teacher (the float model, exactly, inside the
student), the distillation loss against a naive float64 one, the teacher's memory, and the config's checks."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import qaft
from qaft.methods import DEFAULT_TARGETS
from qaft.methods.api import qaft_layers
from qaft.methods.distill import distillation_loss, distilled_loss
from qaft.methods.llm_qat import LLMQATLinear, absmax_scale
from qaft.methods.targets import resolve_targets
from qaft.quant import PerTokenQuantizer

from helpers import tiny_llama, token_batch
from method_matrix import methods


def _reference_fake_quant(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """LLM-QAT's weight quantizer written directly, in float64: ``s = max|W_g| / (2^(n-1) - 1)``, ``s round(W / s)``."""
    qmax = 2 ** (bits - 1) - 1
    wg = w.double().reshape(w.shape[0], -1, group)
    s = wg.abs().amax(-1, keepdim=True) / qmax
    return (s * torch.round(wg / s)).reshape(w.shape)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [-1, 32])
def test_weight_quantizer_matches_the_formula_and_passes_gradients_straight_through(bits, group_size):
    linear = nn.Linear(64, 24, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 64, generator=torch.Generator().manual_seed(bits)))
    layer = qaft.config_for("llm_qat", bits=bits, group_size=group_size).make_layer(linear)
    wq = layer.quantized_weight()
    group = 64 if group_size == -1 else group_size
    torch.testing.assert_close(wq.double(), _reference_fake_quant(linear.weight.detach(), bits, group),
                               rtol=1e-6, atol=1e-7)
    merged = layer.merge()
    codes = merged.codes()
    assert not merged.offset.any()  # offset 0: zero is a level (the integer-zero grid with z = 2^(n-1))
    qmax = 2 ** (bits - 1) - 1
    assert codes.abs().max() == qmax and codes.min() >= -qmax  # symmetric: -2^(n-1) is never used
    assert layer.scale().shape == (24, 64 // group)
    upstream = torch.randn_like(wq)
    (wq * upstream).sum().backward()
    assert torch.equal(layer.weight.grad, upstream)  # identity: no clipping, no gradient through s


def test_scale_is_recomputed_from_the_current_weight_and_an_all_zero_row_stays_zero():
    linear = nn.Linear(64, 4, bias=False)
    with torch.no_grad():
        linear.weight[0] = 0.0
    layer = qaft.config_for("llm_qat").make_layer(linear)
    assert torch.equal(layer.quantized_weight()[0], torch.zeros(64))
    with torch.no_grad():
        layer.weight[1] *= 3.0
    torch.testing.assert_close(layer.scale()[1], absmax_scale(linear.weight, 4, 1)[1] * 3.0)


def test_teacher_forward_is_the_original_float_model_exactly():
    ids = token_batch(seed=4)
    original = tiny_llama()
    model = qaft.apply_method(tiny_llama(), qaft.config_for("llm_qat", group_size=32, act_bits=8, kv_bits=8))
    opt = torch.optim.AdamW(qaft.parameter_groups(model)["weight"], lr=1e-2)
    model.train()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    teacher = model.qaft_config.teacher(model)
    with torch.no_grad():
        student = model(ids).logits
        with teacher:
            assert not model.training and all(layer.teaching for layer in qaft_layers(model))
            taught = model(ids).logits
        back = model(ids).logits
        expected = original(ids).logits
    assert torch.equal(taught, expected)
    assert torch.equal(back, student) and not torch.equal(student, expected)  # the student is back on exit
    assert model.training and not any(layer.teaching for layer in qaft_layers(model))
    assert sum(isinstance(m, PerTokenQuantizer) for m in model.modules()) == 18


def test_the_teacher_costs_one_copy_of_the_target_weights_and_is_never_saved():
    original = tiny_llama()
    model = qaft.apply_method(tiny_llama(), qaft.config_for("llm_qat"))
    layers = qaft_layers(model)
    assert all(isinstance(layer, LLMQATLinear) for layer in layers) and len(layers) == 14
    targets = {n: original.get_submodule(n).weight for n in resolve_targets(original, DEFAULT_TARGETS).quantized}
    teacher_bytes = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("teacher_weight"))
    assert teacher_bytes == sum(w.numel() * w.element_size() for w in targets.values())
    assert not any("teacher" in key for key in model.state_dict())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.weight" for n in targets}  # embeddings, norms, lm_head: frozen, shared with the teacher


def _naive_distillation(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The loss position by position, in float64."""
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(labels.shape[0]):
        for t in range(labels.shape[1] - 1):
            if labels[b, t + 1] == -100:
                continue
            p = torch.softmax(teacher[b, t].double(), -1)
            total = total - (p * torch.log_softmax(student[b, t].double(), -1)).sum()
            count += 1
    return total / count


def test_distillation_loss_equals_the_naive_float64_formula_with_its_gradient():
    g = torch.Generator().manual_seed(0)
    student = (3 * torch.randn(3, 7, 11, generator=g)).requires_grad_()
    teacher = 3 * torch.randn(3, 7, 11, generator=g)
    labels = torch.randint(0, 11, (3, 7), generator=g)
    labels[0, :4] = -100  # a prompt without labels
    labels[2, 5:] = -100  # padding
    loss = distillation_loss(student, teacher, labels)
    naive_student = student.detach().double().requires_grad_()
    naive = _naive_distillation(naive_student, teacher, labels)
    torch.testing.assert_close(loss.double(), naive, rtol=1e-6, atol=0)
    loss.backward()
    naive.backward()
    torch.testing.assert_close(student.grad.double(), naive_student.grad, rtol=1e-5, atol=1e-8)
    empty = distillation_loss(student, teacher, torch.full_like(labels, -100))
    assert empty.item() == 0.0 and empty.requires_grad


def _gap_at_step_0(ids: torch.Tensor, **fields) -> float:
    """Loss minus the teacher's entropy, i.e. KL(teacher || student), before any training."""
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model = qaft.apply_method(tiny_llama(), qaft.config_for("llm_qat", **fields))
    with torch.no_grad():
        loss = distilled_loss(model, batch, model.qaft_config.teacher(model))
        p = torch.softmax(tiny_llama()(ids).logits[:, :-1].double(), -1)
    return float(loss.double() + (p * p.log()).sum(-1).mean())


def test_at_step_0_the_loss_is_the_teacher_entropy_plus_the_quantization_gap():
    """Student == teacher up to quantization: the loss is the teacher's entropy plus KL(teacher || student) >= 0,
    next to nothing at 8-bit weights with float activations, two orders of magnitude more at W4A8KV8 (the random
    tiny model's predictions are nearly uniform, so every gap here is small in absolute terms)."""
    ids = token_batch(seed=2)
    near, w4a8kv8 = _gap_at_step_0(ids, bits=8), _gap_at_step_0(ids, bits=4, act_bits=8, kv_bits=8)
    assert 0 < near < 1e-5 and w4a8kv8 > 100 * near


def test_distilled_training_lowers_the_loss():
    ids = token_batch(seed=5, length=24)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    model = qaft.apply_method(tiny_llama(), qaft.config_for("llm_qat", bits=2, act_bits=8, kv_bits=8))
    opt = torch.optim.AdamW(qaft.parameter_groups(model)["weight"], lr=3e-4)
    model.train()
    losses = []
    for _ in range(6):
        loss = distilled_loss(model, batch, model.qaft_config.teacher(model))
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < losses[0] - 2e-3, losses  # about half of the 2-bit gap (~7e-3) closed


def test_other_methods_have_no_teacher():
    for name in methods(teacher=False):
        assert qaft.config_for(name).teacher(tiny_llama()) is None, name


@pytest.mark.parametrize("fields, message", [
    ({"group_size": 48}, r"q_proj: group_size=48 does not divide in_features=64"),
    ({"bits": 5}, r"bits must be one of \(2, 3, 4, 8\), got 5"),
    ({"group_size": 0}, r"group_size must be -1 \(per channel\) or a positive integer, got 0"),
    ({"init": "mse"}, r"method 'llm_qat' has no field\(s\) \['init'\]"),
    ({"symmetric": False}, r"method 'llm_qat' has no field\(s\) \['symmetric'\]"),
])
def test_bad_settings_raise_one_line(fields, message):
    with pytest.raises(ValueError, match=message):
        qaft.apply_method(tiny_llama(), qaft.config_for("llm_qat", **fields))

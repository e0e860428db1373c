"""One matrix over every method: merge equivalence, PTQ at init, phases, training, save/load, bad input."""
import copy

import pytest
import torch
from torch import nn

import qaft
from qaft.methods import QuantizedLinear
from qaft.quant import PerTokenQuantizer

from helpers import tiny_llama, token_batch

INTEGER = ("l4q", "dlqat", "qalora", "ptq", "qat", "llm_qat")
FLOAT = ("lora", "qlora", "loftq", "qat_lora")
# Small group so the tiny model has several groups per row; dlqat gets 2 quantizer steps then LoRA steps.
FIELDS = {
    "lora": {}, "qlora": {}, "loftq": {"loftq_iters": 2}, "qat_lora": {"group_size": 32},
    "qalora": {"group_size": 32}, "l4q": {"group_size": 32}, "dlqat": {"group_size": 32, "quant_steps": 2},
    "ptq": {"group_size": 32}, "qat": {"group_size": 32}, "llm_qat": {},  # llm_qat: per channel, the method's
}


def test_registry_lists_every_method():
    assert qaft.available() == sorted(FIELDS)


def _train(model, steps=6, lr=1e-2):
    params = [p for group in qaft.parameter_groups(model).values() for p in group]
    opt = torch.optim.AdamW(params, lr=lr) if params else None
    ids, losses = token_batch(), []
    model.train()
    for step in range(steps):
        qaft.set_training_step(model, step)
        loss = model(ids, labels=ids).loss
        losses.append(loss.item())
        if opt is not None:
            loss.backward()
            opt.step()
            opt.zero_grad()
    return model.eval(), losses


def _applied(name, seed=0, **extra):
    return qaft.apply_method(tiny_llama(seed), qaft.config_for(name, **{**FIELDS[name], **extra}))


# W-A-KV: the per-token activation and KV quantizers (qaft.methods.act_kv), which the merge keeps.
ACT_KV = {"weight-only": {}, "a8kv8": {"act_bits": 8, "kv_bits": 8}}
# Merges that reproduce the training forward bit for bit. The others agree to float rounding (x (W + BA) is not
# x W + x A B to the last bit), and with activations quantized a 1e-7 difference that lands on a rounding tie
# moves one code by a whole step, ~1e-3 in the logits: those are compared layer by layer on the same inputs.
BIT_EXACT = ("l4q", "ptq", "qat", "llm_qat")


def _raw_output(module, record):
    """A forward hook that runs before the module's own (the KV output quantizer) and records what it sees."""
    return module.register_forward_hook(lambda m, a, out: record.append(out), prepend=True)


def _teacher_forced(model, merged, ids):
    """``(training output, merged layer's output)`` of every quantized module, the merged module fed the very
    input the training one got (before its input quantizer, so both input quantizers run). Outputs are taken
    before the KV output quantizer: there a 1e-7 difference may still move a code across a rounding tie, which
    says nothing about the merge (the merged model keeps the quantizer itself: checked by the caller)."""
    names = [n for n, m in merged.named_modules() if any(isinstance(c, PerTokenQuantizer) for c in m.children())]
    inputs, outputs, handles = {}, {}, []
    for name in names:
        module = model.get_submodule(name)
        handles.append(module.register_forward_pre_hook(
            lambda m, a, n=name: inputs.__setitem__(n, a[0]), prepend=True))
        handles.append(_raw_output(module, outputs.setdefault(name, [])))
    model(ids)
    for handle in handles:
        handle.remove()
    pairs = []
    for name in names:
        deployed, raw = merged.get_submodule(name), []
        handle = _raw_output(deployed, raw)
        deployed(inputs[name])
        handle.remove()
        pairs.append((outputs[name][0], raw[0]))
    return pairs


@pytest.mark.parametrize("act_kv", sorted(ACT_KV))
@pytest.mark.parametrize("name", sorted(FIELDS))
def test_merged_model_equals_training_forward(name, act_kv):
    model, _ = _train(_applied(name, **ACT_KV[act_kv]))
    layers = qaft.methods.api.qaft_layers(model)
    if name != "ptq":
        full_qat = name in ("qat", "llm_qat")  # no adapter: the weights themselves train
        assert full_qat or any(layer.lora_B.abs().sum() > 0 for layer in layers if hasattr(layer, "lora_B"))
    merged = qaft.merge_model(model)
    deployed = [m for m in merged.modules() if isinstance(m, (QuantizedLinear, nn.Linear))]
    kinds = {type(m) for m in deployed if not isinstance(m, nn.Embedding)}
    ids = token_batch(seed=7)
    with torch.no_grad():
        if not ACT_KV[act_kv] or name in BIT_EXACT:
            torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        else:
            for trained, deployed_out in _teacher_forced(model, merged, ids):
                torch.testing.assert_close(deployed_out, trained, rtol=1e-5, atol=1e-5)
    quantizers = sorted(n.rpartition(".")[2] for n, m in merged.named_modules() if isinstance(m, PerTokenQuantizer))
    assert quantizers == ([] if not ACT_KV[act_kv] else ["input_quantizer"] * 14 + ["output_quantizer"] * 4)
    if name in INTEGER:
        assert sum(isinstance(m, QuantizedLinear) for m in merged.modules()) == 14
        assert not qaft.methods.api.qaft_layers(merged)
    else:
        assert QuantizedLinear not in kinds


@pytest.mark.parametrize("name", ["l4q", "qat", "dlqat", "qalora", "llm_qat"])
def test_deployed_weights_are_the_trained_quantized_weights(name):
    """Layer by layer: the integer layer dequantizes to exactly (or to float rounding) the training Wq."""
    model, _ = _train(_applied(name, quant_steps=1) if name == "dlqat" else _applied(name))
    x = torch.randn(3, 64)
    for layer in qaft.methods.api.qaft_layers(model):
        if layer.in_features != 64:
            continue
        deployed = layer.merge()
        with torch.no_grad():
            exact = name in ("l4q", "qat", "llm_qat")
            tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(deployed(x), layer(x), **tol)


@pytest.mark.parametrize("name", ["l4q", "dlqat", "qalora"])
@pytest.mark.parametrize("init", ["minmax", "l4q", "mse"])
def test_at_init_equals_ptq_with_the_same_init(name, init):
    ids = token_batch()
    method = _applied(name, init=init)
    ptq = _applied("ptq", init=init)
    with torch.no_grad():
        torch.testing.assert_close(method(ids).logits, ptq(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(set(FIELDS) - {"ptq"}))
def test_a_few_steps_lower_the_loss(name):
    _, losses = _train(_applied(name), steps=8)
    assert losses[-1] < losses[0] - 0.05, losses


def _trainable(model):
    names = {n.rsplit(".", 1)[-1] for n, p in model.named_parameters() if p.requires_grad}
    return names


@pytest.mark.parametrize("name, fields, phases", [
    ("lora", {}, [(0, "train", {"lora_A", "lora_B"})]),
    ("qalora", {}, [(0, "train", {"lora_A", "lora_B"})]),
    ("qat", {}, [(0, "train", {"weight", "scale", "offset"})]),
    ("llm_qat", {}, [(0, "train", {"weight"})]),
    ("ptq", {}, [(0, "train", set())]),
    ("l4q", {"warmup_steps": 3}, [(0, "warmup", {"lora_A", "lora_B"}), (2, "warmup", {"lora_A", "lora_B"}),
                                   (3, "train", {"lora_A", "lora_B", "scale", "offset"})]),
    ("l4q", {"symmetric": True}, [(0, "train", {"lora_A", "lora_B", "scale"})]),
    ("dlqat", {"quant_steps": 5}, [(4, "quant", {"scale", "offset"}), (5, "train", {"magnitude", "lora_A", "lora_B"})]),
    ("dlqat", {"magnitude": False}, [(0, "quant", {"scale", "offset"}), (1000, "train", {"lora_A", "lora_B"})]),
    ("dlqat", {"clipping": "learned"}, [(0, "train", {"magnitude", "lora_A", "lora_B", "scale", "offset"})]),
    ("dlqat", {"clipping": "dynamic", "magnitude": False}, [(0, "train", {"lora_A", "lora_B"})]),
])
def test_trainable_parameters_per_phase(name, fields, phases):
    model = _applied(name, **fields)
    for step, phase, expected in phases:
        assert qaft.set_training_step(model, step) == phase
        assert _trainable(model) == expected
    everything_else = [n for n, p in model.named_parameters() if p.requires_grad and "layers" not in n]
    assert not everything_else  # embeddings, norms and head stay frozen


def test_l4q_warmup_trains_lora_outside_the_quantizer_then_inside():
    model = _applied("l4q", warmup_steps=3)
    _train(model, steps=3)
    layer = qaft.methods.api.qaft_layers(model)[0]
    assert layer.phase == "warmup" and layer.lora_B.abs().sum() > 0
    x = torch.randn(2, 64)
    with torch.no_grad():
        outside = layer(x)
        layer.set_phase("train")
        inside = layer(x)
    assert not torch.allclose(outside, inside)
    torch.testing.assert_close(layer.merge()(x), inside, rtol=0, atol=0)


@pytest.mark.parametrize("clipping", ["learned_fixed", "learned", "dynamic"])
@pytest.mark.parametrize("magnitude", [True, False])
def test_dlqat_table3_variants_train_and_merge(clipping, magnitude):
    model, losses = _train(_applied("dlqat", clipping=clipping, magnitude=magnitude, quant_steps=2))
    assert losses[-1] < losses[0]
    merged = qaft.merge_model(model)
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["l4q", "dlqat"])
def test_lowrank_qat_layer_merges_bit_exactly(name):
    """With m folded into the group parameters, the merged layer dequantizes to exactly the trained Wq."""
    model, _ = _train(_applied(name))
    for layer in qaft.methods.api.qaft_layers(model):
        x = torch.randn(3, layer.in_features)
        if getattr(layer, "magnitude", None) is not None:
            assert not torch.all(layer.magnitude == 1)  # m trained, so the fold is exercised
        with torch.no_grad():
            torch.testing.assert_close(layer.merge()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(FIELDS))
def test_save_and_load_reproduce_the_model(name):
    model, _ = _train(_applied(name))
    fresh = _applied(name, seed=0)
    fresh.load_state_dict(model.state_dict())
    ids = token_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)
    merged = qaft.merge_model(model)
    reloaded = copy.deepcopy(merged)
    for p in reloaded.parameters():
        p.data.zero_()
    reloaded.load_state_dict(merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, rtol=0, atol=0)


def test_ptq_after_float_merge_gives_integer_layers():
    model, _ = _train(_applied("qlora"))
    deployed = qaft.ptq_model(qaft.merge_model(model), bits=4, group_size=32)
    layers = [m for m in deployed.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and {m.bits for m in layers} == {4}


@pytest.mark.parametrize("fields, message", [
    ({"group_size": 48}, r"group_size=48 does not divide in_features=64.*allowed: -1 \(per channel\)"),
    ({"bits": 5}, r"bits must be one of \(2, 3, 4, 8\), got 5"),
    ({"rank": 0}, r"rank must be a positive integer, got 0"),
    ({"init": "kmeans"}, r"init must be one of \['minmax', 'l4q', 'mse'\]"),
    ({"warmup": 3}, r"method 'l4q' has no field\(s\) \['warmup'\]; its fields: .*warmup_steps"),
])
def test_bad_input_raises_at_construction(fields, message):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        qaft.apply_method(model, qaft.config_for("l4q", **fields))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not qaft.methods.api.qaft_layers(model)


def test_unknown_method_names_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown method 'gptq4'; available: \['dlqat', 'l4q'"):
        qaft.config_for("gptq4")


def test_other_choices_are_validated():
    with pytest.raises(ValueError, match=r"clipping must be one of \['learned_fixed', 'learned', 'dynamic'\]"):
        qaft.config_for("dlqat", clipping="fixed")
    with pytest.raises(ValueError, match="bits must be 4 with base='nf4'"):
        qaft.config_for("loftq", bits=3)
    with pytest.raises(ValueError, match="target_modules"):
        qaft.apply_method(tiny_llama(), qaft.config_for("lora", target_modules=("c_attn",)))

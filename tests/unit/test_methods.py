"""One matrix over every method: merge equivalence, PTQ at init, phases, training, save/load, bad input.

Which methods each check runs on comes from their traits (``method_matrix``); the first tests below check that
the matrix holds every registered method and that every trait some method has is checked somewhere.
"""
import copy
import dataclasses

import pytest
import torch
from torch import nn

import qaft
from qaft.methods import INTEGER, MethodTraits, QuantizedLinear, registered, traits
from qaft.methods.config import MethodConfig, register
from qaft.quant import PerTokenQuantizer

from helpers import tiny_llama, token_batch
from method_matrix import CHECKS, EVERY_METHOD, TRAITS, applied, methods, parametrized_methods


@pytest.mark.parametrize("check", EVERY_METHOD)
def test_the_matrix_holds_every_registered_method(check):
    assert parametrized_methods(check) == set(qaft.available())


@pytest.mark.parametrize("name", methods())
def test_every_method_declares_its_traits_and_a_small_example(name):
    """Its own traits (none inherited), completed at registration, and an example config the tiny model takes."""
    cls = registered(name)
    assert isinstance(vars(cls).get("traits"), MethodTraits) and all(getattr(cls.traits, t) is not None for t in TRAITS)
    assert bool(qaft.methods.api.qaft_layers(applied(name))) == traits(name).trains
    assert bool(cls.calibrated_fields) == traits(name).calibration


def test_every_trait_a_method_has_is_checked_on_every_such_method():
    missing, unchecked = [], {}
    for trait in TRAITS:
        for value in {getattr(traits(name), trait) for name in methods()} - {False}:
            if (trait, value) not in CHECKS:
                missing.append((trait, value))
                continue
            holders = set(methods(**{trait: value}))
            per_check = [parametrized_methods(check) for check in CHECKS[trait, value]]
            assert all(covered & holders for covered in per_check), f"a check of {trait}={value!r} runs on none"
            if not holders <= set().union(*per_check):
                unchecked[trait, value] = sorted(holders - set().union(*per_check))
    assert not missing, f"trait values no test checks (add them to method_matrix.CHECKS): {missing}"
    assert not unchecked, f"methods a trait's checks do not run on: {unchecked}"


def test_a_method_declares_its_own_traits_and_only_what_its_code_does_not_say():
    with pytest.raises(TypeError, match="must declare its traits"):
        register(type("Undeclared", (MethodConfig,), {"name": "undeclared"}))
    stated = dataclasses.replace(traits("lora"), teacher=None, zero_point=None, act_kv=None, calibration=None)
    with pytest.raises(TypeError, match=r"\['adapter'\] follow from the class"):
        register(type("Overstated", (MethodConfig,), {"name": "overstated", "traits": stated}))
    with pytest.raises(ValueError, match="merges_to must be one of"):
        MethodTraits(merges_to="int4")
    assert "undeclared" not in qaft.available() and "overstated" not in qaft.available()


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


# W-A-KV: the per-token activation and KV quantizers (qaft.methods.act_kv), which the merge keeps.
ACT_KV = {"weight-only": {}, "a8kv8": {"act_bits": 8, "kv_bits": 8}}
# Merges of bit-exact methods (traits.bit_exact) reproduce the training forward bit for bit. The others agree to
# float rounding (x (W + BA) is not x W + x A B to the last bit), and with activations quantized a 1e-7 difference
# that lands on a rounding tie moves one code by a whole step, ~1e-3 in the logits: those are compared layer by
# layer on the same inputs.


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
@pytest.mark.parametrize("name", methods())
def test_merged_model_equals_training_forward(name, act_kv):
    model, _ = _train(applied(name, **ACT_KV[act_kv]))
    if traits(name).adapter:  # the adapter trained, so the merge has something to fold
        assert any(layer.lora_B.abs().sum() > 0 for layer in qaft.methods.api.qaft_layers(model))
    merged = qaft.merge_model(model)
    deployed = [m for m in merged.modules() if isinstance(m, (QuantizedLinear, nn.Linear))]
    kinds = {type(m) for m in deployed if not isinstance(m, nn.Embedding)}
    ids = token_batch(seed=7)
    with torch.no_grad():
        if traits(name).bit_exact:
            torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=0, atol=0)
        elif not ACT_KV[act_kv]:
            torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        else:
            for trained, deployed_out in _teacher_forced(model, merged, ids):
                torch.testing.assert_close(deployed_out, trained, rtol=1e-5, atol=1e-5)
    quantizers = sorted(n.rpartition(".")[2] for n, m in merged.named_modules() if isinstance(m, PerTokenQuantizer))
    assert quantizers == ([] if not ACT_KV[act_kv] else ["input_quantizer"] * 14 + ["output_quantizer"] * 4)
    if traits(name).merges_to == INTEGER:
        assert sum(isinstance(m, QuantizedLinear) for m in merged.modules()) == 14
        assert not qaft.methods.api.qaft_layers(merged)
    else:
        assert QuantizedLinear not in kinds


@pytest.mark.parametrize("name", methods(merges_to=INTEGER, trains=True))
def test_deployed_weights_are_the_trained_quantized_weights(name):
    """Layer by layer: the integer layer dequantizes to exactly (bit-exact methods) or to float rounding the
    training Wq."""
    model, _ = _train(applied(name))
    x = torch.randn(3, 64)
    tol = dict(rtol=0, atol=0) if traits(name).bit_exact else dict(rtol=1e-5, atol=1e-6)
    for layer in qaft.methods.api.qaft_layers(model):
        if layer.in_features != 64:
            continue
        deployed = layer.merge()
        with torch.no_grad():
            torch.testing.assert_close(deployed(x), layer(x), **tol)


@pytest.mark.parametrize("name", methods(starts_at_ptq=True))
@pytest.mark.parametrize("init", ["minmax", "l4q", "mse"])
def test_at_init_equals_ptq_with_the_same_init(name, init):
    ids = token_batch()
    method = applied(name, init=init)
    ptq = applied("ptq", init=init)
    with torch.no_grad():
        torch.testing.assert_close(method(ids).logits, ptq(ids).logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", methods(trains=True))
def test_a_few_steps_lower_the_loss(name):
    _, losses = _train(applied(name), steps=8)
    assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize("name", methods())
def test_the_trained_members_are_the_declared_ones(name):
    """The parameter roles that train are the traits': ``lora`` for an adapter, ``quant`` for a trained quantizer
    (a ``quantizer`` submodule), ``weight`` for full QAT; nothing for PTQ."""
    t, model = traits(name), applied(name)
    roles = {role for role, on in (("lora", t.adapter), ("quant", t.trains_quantizer), ("weight", t.trains_weights))
             if on}
    assert set(qaft.parameter_groups(model)) == roles and t.trains == bool(roles)
    assert all(hasattr(layer, "quantizer") == t.trains_quantizer for layer in qaft.methods.api.qaft_layers(model))


@pytest.mark.parametrize("name", methods())
def test_a_teacher_computes_the_float_model(name):
    """A method with a teacher computes, under ``config.teacher(model)``, the float model it was built from (its
    activation and KV quantizers off); the others have none."""
    model = applied(name, act_bits=8, kv_bits=8)
    teacher = model.qaft_config.teacher(model)
    assert (teacher is not None) == traits(name).teacher
    if teacher is not None:
        ids = token_batch(seed=2)
        with teacher, torch.no_grad():
            torch.testing.assert_close(model(ids).logits, tiny_llama()(ids).logits, rtol=0, atol=0)


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
    model = applied(name, **fields)
    for step, phase, expected in phases:
        assert qaft.set_training_step(model, step) == phase
        assert _trainable(model) == expected
    everything_else = [n for n, p in model.named_parameters() if p.requires_grad and "layers" not in n]
    assert not everything_else  # embeddings, norms and head stay frozen


def test_l4q_warmup_trains_lora_outside_the_quantizer_then_inside():
    model = applied("l4q", warmup_steps=3)
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
    model, losses = _train(applied("dlqat", clipping=clipping, magnitude=magnitude, quant_steps=2))
    assert losses[-1] < losses[0]
    merged = qaft.merge_model(model)
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", methods(adapter=True, trains_quantizer=True))
def test_lowrank_qat_layer_merges_bit_exactly(name):
    """LoRA inside a trained quantizer (L4Q, DL-QAT): with m folded into the group parameters, the merged layer
    dequantizes to exactly the trained Wq."""
    model, _ = _train(applied(name))
    for layer in qaft.methods.api.qaft_layers(model):
        x = torch.randn(3, layer.in_features)
        if getattr(layer, "magnitude", None) is not None:
            assert not torch.all(layer.magnitude == 1)  # m trained, so the fold is exercised
        with torch.no_grad():
            torch.testing.assert_close(layer.merge()(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("name", methods())
def test_save_and_load_reproduce_the_model(name):
    model, _ = _train(applied(name))
    fresh = applied(name, seed=0)
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
    model, _ = _train(applied("qlora"))
    deployed = qaft.ptq_model(qaft.merge_model(model), bits=4, group_size=32)
    layers = [m for m in deployed.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14 and {m.bits for m in layers} == {4}


@pytest.mark.parametrize("fields, message", [
    ({"group_size": 48}, r"group_size=48 does not divide in_features=64.*allowed: -1 \(per channel\)"),
    ({"bits": 5}, r"bits must be one of \(2, 3, 4, 8\), got 5"),
    ({"rank": 0}, r"rank must be a positive integer, got 0"),
    ({"init": "kmeans"}, r"init must be one of \['minmax', 'l4q', 'mse', 'omniquant_lwc'\]"),
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
    with pytest.raises(ValueError, match=r"unknown method 'gptq4'; available: \['dlqat', 'efficientqat', 'l4q'"):
        qaft.config_for("gptq4")


def test_other_choices_are_validated():
    with pytest.raises(ValueError, match=r"clipping must be one of \['learned_fixed', 'learned', 'dynamic'\]"):
        qaft.config_for("dlqat", clipping="fixed")
    with pytest.raises(ValueError, match="bits must be 4 with base='nf4'"):
        qaft.config_for("loftq", bits=3)
    with pytest.raises(ValueError, match="target_modules"):
        qaft.apply_method(tiny_llama(), qaft.config_for("lora", target_modules=("c_attn",)))

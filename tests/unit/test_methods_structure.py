"""The shared structure of method layers: the quantizer submodule and its state-dict names, phases from the
config, QA-LoRA's constructors, the shared straight-through terms, and the in-place merge."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

import qaft
from qaft.methods.dlqat import DLQATLinear
from qaft.methods.layer import QaftLinear
from qaft.methods.qalora import QALoRALinear
from qaft.quant import AffineQuantizer
from qaft.quant.affine import in_range, scale_grad_term, ste_terms
from qaft.quant.linear import rtn_quantize_linear

from helpers import token_batch, train_steps
from method_matrix import applied, int_zero_fields, methods


def _trained(name: str, steps: int = 3, **extra) -> nn.Module:
    return train_steps(applied(name, **extra), token_batch(), steps)


@pytest.mark.parametrize("name", methods())
def test_in_place_merge_equals_the_copying_merge(name):
    model = _trained(name)
    ids = token_batch(seed=7)
    with torch.no_grad():
        copied = qaft.merge_model(model)(ids).logits
        in_place = qaft.merge_model(model, inplace=True)
        assert in_place is model and not qaft.methods.api.qaft_layers(model)
        torch.testing.assert_close(in_place(ids).logits, copied, rtol=0, atol=0)


@pytest.mark.parametrize("name", methods(trains=True))
def test_in_place_merge_frees_each_layer_as_it_replaces_it(name, monkeypatch):
    model = _trained(name, steps=1)
    layers = qaft.methods.api.qaft_layers(model)
    alive = [weakref.ref(layer) for layer in layers]
    del layers
    gc.collect()
    merge = type(alive[0]()).merge
    still_alive = []

    def merge_and_count(layer):
        still_alive.append(sum(ref() is not None for ref in alive))
        return merge(layer)

    monkeypatch.setattr(type(alive[0]()), "merge", merge_and_count)
    gc.disable()  # freed by reference counting alone, as soon as replaced: no layer may sit in a reference cycle
    try:
        qaft.merge_model(model, inplace=True)
        # at the k-th merge only the k-th layer and the ones not merged yet exist
        assert still_alive == list(range(len(alive), 0, -1))
        assert all(ref() is None for ref in alive)
    finally:
        gc.enable()


@pytest.mark.parametrize("name", methods(trains_quantizer=True))
@pytest.mark.parametrize("quant", [{}, {"zero_point": "int"}, {"symmetric": True}])
def test_the_quantizer_is_a_submodule_and_its_state_is_named_under_it(name, quant):
    model = _trained(name, steps=1, **quant)
    layer = qaft.methods.api.qaft_layers(model)[0]
    assert isinstance(layer.quantizer, AffineQuantizer) and layer.trained_quantizer() is layer.quantizer
    state = {"scale", "zero"} if quant.get("zero_point") == "int" else {"scale", "offset"}
    keys = {k for k in layer.state_dict() if k.startswith("quantizer.")}
    assert keys == {f"quantizer.{n}" for n in state}
    assert not {"scale", "offset", "zero"} & set(layer.state_dict())
    # a symmetric quantizer's zero offset is a buffer: checkpoints keep it next to what trains
    assert layer.state_buffers() == (["quantizer.offset"] if quant.get("symmetric") else [])
    assert any(p is layer.quantizer.scale for p in qaft.parameter_groups(model)["quant"])


@pytest.mark.parametrize("name", methods(adapter=True, trains_quantizer=False))
def test_frozen_bases_keep_their_group_parameters_in_checkpoints(name):
    """LoRA over a frozen base: an integer base (the methods with a zero point, LoftQ on its integer base) keeps
    its per-group scale and offset in training checkpoints; a float or NF4 base keeps nothing."""
    layer = qaft.methods.api.qaft_layers(applied(name, **int_zero_fields(name)))[0]
    expected = ["scale", "offset"] if qaft.methods.traits(name).zero_point else []
    assert layer.state_buffers() == expected and not hasattr(layer, "quantizer")


@pytest.mark.parametrize("name", methods(trains_quantizer=True))
def test_state_dicts_with_the_old_flat_quantizer_names_still_load(name):
    """Checkpoints written before the quantizer became a submodule name its tensors ``<layer>.scale``."""
    trained = _trained(name)
    old = {k.replace(".quantizer.", "."): v for k, v in trained.state_dict().items()}
    assert any(k.endswith("q_proj.scale") for k in old)
    fresh = applied(name)
    fresh.load_state_dict(old)  # strict: every old key lands in a new one
    ids = token_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, trained(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("fields, train", [
    ({}, {"magnitude", "lora_A", "lora_B"}),
    ({"magnitude": False}, {"lora_A", "lora_B"}),
    ({"clipping": "learned"}, {"magnitude", "lora_A", "lora_B", "quantizer"}),
])
def test_dlqat_phases_follow_the_config_without_touching_the_class(fields, train):
    linear = nn.Linear(64, 32)
    layer = qaft.config_for("dlqat", group_size=32, **fields).make_layer(linear)
    assert layer.phases() == {"quant": frozenset({"quantizer"}), "train": frozenset(train)}
    assert "PHASES" not in vars(layer) and DLQATLinear.PHASES == QaftLinear.PHASES == {}


def test_qalora_builds_through_one_constructor():
    config = qaft.config_for("qalora", bits=3, group_size=32, rank=4)
    linear = nn.Linear(64, 16)
    torch.manual_seed(0)
    from_linear = QALoRALinear.from_linear(linear, config)
    torch.manual_seed(0)
    from_quantized = QALoRALinear.from_quantized(rtn_quantize_linear(linear, 3, 32), config)
    for a, b in zip(from_linear.state_dict().values(), from_quantized.state_dict().values()):
        assert torch.equal(a, b)
    assert (from_linear.in_features, from_linear.out_features, from_linear.n_groups) == (64, 16, 2)
    with pytest.raises(ValueError, match="does not match the config"):
        QALoRALinear.from_quantized(rtn_quantize_linear(linear, 4, 32), config)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_the_straight_through_terms_in_place_equal_the_pure_ones(bits):
    v = torch.randn(8, 4, 16, generator=torch.Generator().manual_seed(bits)) * 2 ** (bits - 1) * 1.3
    q, inside, ds = ste_terms(v, bits)
    assert bool((~inside).any()) and bool(inside.any())
    consumed = v.clone()
    out = scale_grad_term(q, consumed, in_range(consumed, bits), out=consumed)
    assert out.data_ptr() == consumed.data_ptr() and torch.equal(out, ds)
    assert torch.equal(ds[~inside], q[~inside]) and torch.equal(ds[inside], (q - v)[inside])

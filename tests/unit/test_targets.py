"""Target resolution per model (qaft.methods.targets): refusals in one line, GPT-2's Conv1D, the K / V columns of
fused projections, and FSDP's wrap policy from the model's own blocks."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import qaft
from qaft.methods.fused_kv import FusedKVQuantizer, fused_kv_parts
from qaft.methods.targets import TargetError, as_conv1d, as_linear
from qaft.models.architectures import small_config, small_model
from qaft.quant.activation import fake_quantize_per_token
from qaft.training.fsdp import NoSplitModulesPolicy

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("targets, what", [(("c_attn", "nope"), r"'nope' is no layer of the model"),
                                           (("wte",), r"'wte' is a Embedding, not a linear layer qaft can quantize")])
def test_a_target_the_model_lacks_or_cannot_quantize_is_one_line_naming_its_linear_layers(targets, what):
    model = small_model("gpt2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TargetError, match=rf"^target_modules=.*{what}; the model's linear layers: "
                                          r"\['c_attn', 'c_fc', 'c_proj', 'lm_head'\] \(or 'all-linear'") as err:
        qaft.apply_method(model, qaft.config_for("lora", target_modules=targets))
    assert "\n" not in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not hasattr(model, "qaft_config")


def test_an_integer_method_refuses_block_weights_it_cannot_quantize_and_a_float_one_records_them():
    with pytest.raises(TargetError, match=r"^method 'qat' merges to integer layers, but .*MixtralExperts.* stay "
                                          r"float; name the layers to quantize in target_modules"):
        qaft.apply_method(small_model("mixtral"), qaft.config_for("qat", group_size=32))
    model = qaft.apply_method(small_model("mixtral"), qaft.config_for("lora"))
    record = model.qaft_targets.record()
    assert record["unquantizable"] == {"model.layers.*.mlp.experts": 2, "model.layers.*.mlp.gate": 2}
    assert record["float"] == {"lm_head": 1}
    # named explicitly, the integer method quantizes what it is told and records the rest as float
    named = qaft.apply_method(small_model("mixtral"), qaft.config_for("qat", group_size=32,
                                                                      target_modules=("q_proj", "v_proj")))
    assert named.qaft_targets.record()["quantized"] == {"model.layers.*.self_attn.q_proj": 2,
                                                       "model.layers.*.self_attn.v_proj": 2}
    assert "lm_head" in named.qaft_targets.line() and "o_proj" in named.qaft_targets.line()


def test_lm_head_is_quantized_only_when_named():
    model = qaft.apply_method(small_model("opt"), qaft.config_for("ptq", group_size=32,
                                                                  target_modules=("all-linear", "lm_head")))
    assert "lm_head" in model.qaft_targets.quantized and model.qaft_targets.float_linears == ()


def test_conv1d_converts_to_linear_and_back_exactly():
    torch.manual_seed(0)
    conv = Conv1D(48, 32)
    conv.bias.data.normal_()
    x = torch.randn(3, 5, 32)
    linear = as_linear(conv)
    assert torch.equal(linear(x), conv(x)) and torch.equal(as_conv1d(linear).weight, conv.weight)


def test_a_float_merge_of_gpt2_is_gpt2_again_and_reloads_into_its_own_class():
    model = qaft.apply_method(small_model("gpt2"), qaft.config_for("lora"))
    for layer in qaft.methods.api.qaft_layers(model):
        layer.lora_B.data.normal_()  # a merge with something to fold
    merged = qaft.merge_model(model)
    assert isinstance(merged.transformer.h[0].attn.c_attn, Conv1D)
    reloaded = small_model("gpt2", seed=1)  # what from_pretrained builds, then fills from the saved state dict
    reloaded.load_state_dict(merged.state_dict())
    ids = torch.randint(3, 100, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.eval()(ids).logits, rtol=1e-5, atol=1e-5)


def _columns_by_the_model_split(c, width: int) -> tuple[set[int], set[int]]:
    """K and V output columns of the fused projection (``width`` outputs), found by running each modeling file's
    own split (copied from transformers, on column numbers instead of activations)."""
    y = torch.arange(width).float()[None, None]
    d = c.hidden_size // c.num_attention_heads  # the head size every one of these attentions uses
    if c.model_type == "gpt2":
        _, k, v = y.split(c.n_embd, dim=2)
    elif c.model_type == "gpt_neox":
        _, k, v = y.view(1, 1, -1, 3 * d).chunk(3, dim=-1)
    elif c.model_type == "bloom":
        _, k, v = y.view(1, 1, c.n_head, 3, d).unbind(-2)
    elif c.model_type == "falcon":
        fused = y.view(1, 1, -1, d)
        if c.new_decoder_architecture:
            grouped = fused.view(1, 1, c.num_kv_heads, -1, d)
            k, v = grouped[..., -2, :], grouped[..., -1, :]
        elif c.multi_query:
            _, k, v = fused.split([c.num_attention_heads, 1, 1], dim=-2)
        else:
            _, k, v = fused.unflatten(-2, (c.num_attention_heads, 3)).unbind(-2)
    else:  # phi3
        q, kv = c.num_attention_heads * d, c.num_key_value_heads * d
        k, v = y[..., q:q + kv], y[..., q + kv:]
    return set(k.flatten().long().tolist()), set(v.flatten().long().tolist())


@pytest.mark.parametrize("model_type, layout", [
    ("gpt2", {}), ("phi3", {}), ("gpt_neox", {}), ("bloom", {}), ("falcon", {"multi_query": True}),
    ("falcon", {"multi_query": False}), ("falcon", {"new_decoder_architecture": True, "num_kv_heads": 2})])
def test_fused_kv_columns_are_the_ones_the_attention_reads_as_k_and_v(model_type, layout):
    from transformers import AutoModelForCausalLM

    config = small_config(model_type)
    for key, value in layout.items():
        setattr(config, key, value)
    model = AutoModelForCausalLM.from_config(config)
    (name, (k_index, v_index)), *_ = fused_kv_parts(model).items()
    width = model.get_submodule(name).weight.shape[-1 if model_type == "gpt2" else 0]
    assert (set(k_index.tolist()), set(v_index.tolist())) == _columns_by_the_model_split(config, width)
    assert len(k_index) == len(v_index) and not set(k_index.tolist()) & set(v_index.tolist())


def test_the_fused_quantizer_quantizes_k_and_v_each_per_token_and_leaves_q():
    k, v = torch.tensor([4, 5, 10, 11]), torch.tensor([6, 7, 12, 13])
    y = torch.randn(2, 3, 14)
    out = FusedKVQuantizer(4, k, v)(y)
    assert torch.equal(out[..., k], fake_quantize_per_token(y[..., k], 4))
    assert torch.equal(out[..., v], fake_quantize_per_token(y[..., v], 4))
    rest = [i for i in range(14) if i not in set(k.tolist()) | set(v.tolist())]
    assert torch.equal(out[..., rest], y[..., rest])


def test_kv_bits_on_an_unmapped_fused_layout_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^kv_bits=8 .* this 'mpt' model has no k_proj / v_proj module: set "
                                         r"kv_bits=16"):
        qaft.apply_method(small_model("mpt"), qaft.config_for("ptq", group_size=32, kv_bits=8))


@pytest.mark.parametrize("model_type, block", [("gpt2", "GPT2Block"), ("opt", "OPTDecoderLayer"),
                                               ("llama", "LlamaDecoderLayer")])
def test_fsdp_wraps_the_models_own_decoder_blocks(model_type, block):
    root = nn.ModuleDict({"model": small_model(model_type)})  # the LightningModule holding the HF model
    policy = NoSplitModulesPolicy()
    wrapped = []

    def visit(module: nn.Module) -> None:  # FSDP's recursion: a parent is asked before its children
        if policy(module, recurse=True, nonwrapped_numel=0):
            for child in module.children():
                visit(child)
        if policy(module, recurse=False, nonwrapped_numel=0):
            wrapped.append(type(module).__name__)

    visit(root)
    assert wrapped == [block, block]

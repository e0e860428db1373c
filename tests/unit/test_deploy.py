"""Inference layers (kernel dispatch) and the packed checkpoint, on the tiny random LLaMA."""
import copy

import pytest
import torch

import qaft
from qaft.deploy import (
    DequantLinear,
    Int4Linear,
    Int8Linear,
    backend_counts,
    inference_layer,
    load_quantized,
    prepare_for_inference,
    save_quantized,
)
from qaft.deploy.packed import QUANT_FILE, read_quantization
from qaft.models import build_tiny_llama
from qaft.quant.linear import QuantizedLinear, rtn_quantize_linear

from helpers import fake_run_folder


def _layer(bits, group_size, out_f=48, in_f=256, bias=True, symmetric=False):
    torch.manual_seed(bits * 1000 + group_size)
    lin = torch.nn.Linear(in_f, out_f, bias=bias)
    return rtn_quantize_linear(lin, bits, group_size, symmetric=symmetric)


def _check(layer, dtype, expected_type, backend="kernel"):
    fast = inference_layer(layer, dtype, backend)
    assert isinstance(fast, expected_type)
    x = torch.randn(3, 5, layer.in_features)
    ref = layer(x)  # the dequantize reference, float32
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2}[dtype] * ref.abs().max().item()
    torch.testing.assert_close(fast(x.to(dtype)).float(), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (4, 256), (3, 64), (2, 32)])
def test_int4_path_matches_dequantize_reference(bits, group_size, dtype):
    _check(_layer(bits, group_size), dtype, Int4Linear)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_per_channel_path_with_and_without_offset(symmetric, dtype):
    layer = _layer(8, -1, symmetric=symmetric)
    fast = inference_layer(layer, dtype, "kernel")
    assert (fast.offset is None) == symmetric
    _check(layer, dtype, Int8Linear)


@pytest.mark.parametrize("bits,group_size,in_f", [(4, 16, 256), (8, 64, 256), (4, -1, 320), (4, 192, 576)])
def test_unsupported_layouts_fall_back_to_dequantize(bits, group_size, in_f):
    _check(_layer(bits, group_size, in_f=in_f), torch.float32, DequantLinear)


@pytest.mark.parametrize("bits,group_size,fast_type", [(4, 32, Int4Linear), (3, 64, Int4Linear), (8, -1, Int8Linear)])
def test_auto_uses_cpu_kernels_for_half_precision_only(bits, group_size, fast_type):
    # On CPU both kernels lose to dense fp32 with fp32 activations (measured, see qaft.deploy.kernels).
    layer = _layer(bits, group_size)
    assert isinstance(inference_layer(layer, torch.float32, "auto"), DequantLinear)
    assert isinstance(inference_layer(layer, torch.bfloat16, "auto"), fast_type)
    assert isinstance(inference_layer(layer, torch.float32, "kernel"), fast_type)


def test_dequant_backend_and_bad_backend():
    _check(_layer(4, 32), torch.float32, DequantLinear, backend="dequant")
    with pytest.raises(ValueError, match="backend"):
        inference_layer(_layer(4, 32), torch.float32, "fastest")


def _merged(bits=4, group_size=32):
    return qaft.ptq_model(build_tiny_llama(), bits, group_size)


@pytest.mark.parametrize("backend", ["kernel", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepared_model_logits_and_generate(backend, dtype):
    merged = _merged()
    ids = torch.randint(0, 1000, (2, 12))
    ref = merged(ids).logits
    fast = prepare_for_inference(copy.deepcopy(merged), dtype, backend)
    assert not any(isinstance(m, QuantizedLinear) for m in fast.modules())
    assert sum(backend_counts(fast).values()) == 14
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(fast(ids).logits.float(), ref, rtol=0, atol=tol * ref.abs().max().item())
    out = fast.generate(ids[:1], max_new_tokens=6, do_sample=False)
    assert out.shape == (1, 18)
    if dtype == torch.float32:  # same greedy tokens as the reference model
        assert torch.equal(out, merged.generate(ids[:1], max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64), (2, 32), (8, -1)])
def test_packed_checkpoint_round_trip_is_exact(tmp_path, bits, group_size):
    merged = _merged(bits, group_size)
    save_quantized(merged, tmp_path)
    meta = read_quantization(tmp_path)
    layer = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer == {"bits": bits, "group_size": 64 if group_size == -1 else group_size, "in_features": 64,
                     "out_features": 64, "bias": False}
    loaded = load_quantized(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied, stored once
    ids = torch.randint(0, 1000, (2, 10))
    assert torch.equal(loaded(ids).logits, merged(ids).logits)
    for (n, a), (_, b) in zip(sorted(merged.state_dict().items()), sorted(loaded.state_dict().items())):
        assert torch.equal(a, b), n


def test_checkpoint_with_bias_and_tokenizer(tmp_path):
    from qaft.models import load_tokenizer
    model = build_tiny_llama()
    model.config.attention_bias = True
    for layer in model.model.layers:  # give q_proj a bias so the bias path is exercised
        q = layer.self_attn.q_proj
        q.bias = torch.nn.Parameter(torch.randn(q.out_features))
    merged = qaft.ptq_model(model, 4, 32)
    save_quantized(merged, tmp_path, tokenizer=load_tokenizer("tiny-llama"))
    assert (tmp_path / QUANT_FILE).is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = load_quantized(tmp_path)
    ids = torch.randint(0, 1000, (1, 8))
    assert torch.equal(loaded(ids).logits, merged(ids).logits)


def test_checkpoint_size_is_about_bits_over_16_of_fp16(tmp_path):
    model = build_tiny_llama()
    merged = qaft.ptq_model(model, 4, 32)
    save_quantized(merged, tmp_path)
    linear_fp16 = sum(m.weight.numel() * 2 for m in model.modules()
                      if isinstance(m, torch.nn.Linear) and m is not model.lm_head)
    packed = sum(m.qweight.numel() + m.scale.numel() * 8 for m in merged.modules() if isinstance(m, QuantizedLinear))
    assert packed == pytest.approx(linear_fp16 * 4 / 16 + linear_fp16 / 2 / 32 * 8)
    others = sum(t.numel() * t.element_size() for n, t in model.state_dict().items()
                 if "proj" not in n and n != "lm_head.weight")
    size = (tmp_path / "model.safetensors").stat().st_size
    assert packed + others < size < packed + others + 20_000  # header only on top


def test_save_refuses_float_model(tmp_path):
    with pytest.raises(ValueError, match="QuantizedLinear"):
        save_quantized(build_tiny_llama(), tmp_path)


@pytest.mark.parametrize("kind", ["integer", "float"])
def test_qaft_export_cli_packed(tmp_path, kind):
    from qaft.deploy.cli import main
    float_model = build_tiny_llama()
    merged = qaft.ptq_model(float_model, 4, 32)
    fake_run_folder(tmp_path / "run", merged, float_model if kind == "float" else None)
    assert main([str(tmp_path / "run"), "format=qaft"]) == 0
    loaded = load_quantized(tmp_path / "run" / "export_qaft")
    ids = torch.randint(0, 1000, (1, 8))
    assert torch.equal(loaded(ids).logits, merged(ids).logits)
    assert (tmp_path / "run" / "export_qaft" / "tokenizer_config.json").is_file()

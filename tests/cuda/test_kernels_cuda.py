"""The integer inference layers on CUDA: tinygemm's int4 weight layout (which differs from the CPU kernel's),
layers moved between devices after they were built, and the int8 kernels, against the dequantized model."""
import copy

import pytest
import torch

import qaft
from qaft.deploy import DequantLinear, Int4Linear, Int8Linear, backend_counts, prepare_for_inference
from qaft.deploy.kernels import has_kernel, int4_codes, pack_int4, unpack_int4
from qaft.quant.linear import rtn_quantize_linear

from helpers import tiny_llama, token_batch

pytestmark = pytest.mark.cuda


def _layer(bits, group_size, out_f=48, in_f=256, device="cpu"):
    torch.manual_seed(bits * 1000 + group_size)
    return rtn_quantize_linear(torch.nn.Linear(in_f, out_f).to(device), bits, group_size)


def _close_to_dequantized(fast, layer, x, tol=3e-2):
    """bf16 kernel output against the float32 dequantize reference, within bf16 rounding of its magnitude."""
    ref = layer(x.float())
    torch.testing.assert_close(fast(x).float(), ref, rtol=0, atol=tol * ref.abs().max().item())


@pytest.mark.parametrize("in_f,group_size", [(256, 32), (256, 64), (384, 128), (512, 256), (96, 32)])
def test_int4_codes_round_trip_through_the_cuda_layout(in_f, group_size, device):
    # in 256 / 384 / 96 take inner_k_tiles 8 / 8 / 2 ... (16 * tiles divides in); out a multiple of 8, not 16
    codes = torch.randint(0, 16, (40, in_f), dtype=torch.int32, device=device)
    weight = pack_int4(codes)
    assert weight.is_cuda and weight.dtype == torch.int32 and weight.dim() == 4
    assert torch.equal(unpack_int4(weight, in_f, 40, group_size), codes)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (4, 256), (3, 64), (2, 32)])
def test_int4_layer_built_on_cuda_matches_the_dequantized_layer(bits, group_size, device):
    layer = _layer(bits, group_size, device=device)
    fast = Int4Linear(layer, torch.bfloat16)
    assert torch.equal(fast.codes(), int4_codes(layer))
    for rows in (1, 5, 300):  # a decode step, a short batch, a prefill
        _close_to_dequantized(fast, layer, torch.randn(rows, layer.in_features, device=device, dtype=torch.bfloat16))


def test_int4_layer_built_on_cpu_is_repacked_when_moved(device):
    layer = _layer(4, 64)
    on_cpu = Int4Linear(layer, torch.bfloat16)
    cpu_weight = on_cpu.weight.clone()
    moved = copy.deepcopy(on_cpu).to(device)
    built_there = Int4Linear(copy.deepcopy(layer).to(device), torch.bfloat16)
    assert torch.equal(moved.weight, built_there.weight)  # the CUDA layout, not the CPU bytes
    x = torch.randn(7, layer.in_features, device=device, dtype=torch.bfloat16)
    assert torch.equal(moved(x), built_there(x))
    _close_to_dequantized(moved, layer.to(device), x)
    assert torch.equal(moved.cpu().weight, cpu_weight)  # and back


@pytest.mark.parametrize("bits,group_size", [(4, 32), (3, 64)])
@pytest.mark.parametrize("where", ["built on cuda", "moved to cuda"])
def test_int4_model_logits_match_the_dequantized_float_model(bits, group_size, where, device):
    quantized = qaft.ptq_model(tiny_llama(), bits, group_size)
    reference = prepare_for_inference(copy.deepcopy(quantized).to(device), torch.float32, "dequant")
    if where == "built on cuda":
        fast = prepare_for_inference(copy.deepcopy(quantized).to(device), torch.bfloat16, "auto")
    else:
        fast = prepare_for_inference(copy.deepcopy(quantized), torch.bfloat16, "kernel").to(device)
    assert backend_counts(fast) == {"Int4Linear": 14}
    assert backend_counts(reference) == {"DequantLinear": 14}
    ids = token_batch(seed=7).to(device)
    with torch.no_grad():
        ref, out = reference(ids).logits, fast(ids).logits.float()
    torch.testing.assert_close(out, ref, rtol=0, atol=3e-2 * ref.abs().max().item())


@pytest.mark.parametrize("symmetric", [True, False])
def test_int8_weight_only_layer_on_cuda(symmetric, device):
    layer = rtn_quantize_linear(torch.nn.Linear(256, 48).to(device), 8, -1, symmetric=symmetric)
    if not has_kernel("_weight_int8pack_mm", device):
        assert isinstance(qaft.deploy.inference_layer(layer, torch.bfloat16, "kernel"), DequantLinear)
        pytest.skip(f"torch {torch.__version__} has no CUDA _weight_int8pack_mm: the dense path serves int8")
    fast = Int8Linear(layer, torch.bfloat16)
    for rows in (1, 33):
        _close_to_dequantized(fast, layer, torch.randn(rows, 256, device=device, dtype=torch.bfloat16))


@pytest.mark.parametrize("symmetric", [True, False])
def test_w8a8_layer_on_cuda_including_rows_cublas_refuses(symmetric, device):
    """torch._int_mm on CUDA takes more than 16 rows only: a decode step (1 row) is padded."""
    config = qaft.config_for("ptq", bits=8, group_size=-1, act_bits=8, kv_bits=8, symmetric=symmetric)
    merged = qaft.apply_method(tiny_llama(), config).to(device)
    fast = prepare_for_inference(copy.deepcopy(merged), torch.float32, "kernel")
    assert backend_counts(fast) == {"Int8x8Linear": 14}
    for length in (1, 40):
        ids = token_batch(seed=3, batch=1, length=length).to(device)
        with torch.no_grad():
            ref, out = merged(ids).logits, fast(ids).logits
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-3 * ref.abs().max().item())

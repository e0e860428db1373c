"""Fused projections and the static-cache / compiled greedy loop give the same tokens as the plain model."""
import copy
import warnings

import pytest
import torch

import qaft
from qaft.deploy import Int4Linear, Int8Linear, greedy_generate, prepare_for_inference
from qaft.deploy import decode as decode_mod
from qaft.deploy.fuse import fuse_projections
from qaft.models import build_tiny_llama
from qaft.quant.linear import QuantizedLinear

VOCAB = 512


def _lively_tiny() -> torch.nn.Module:
    """The tiny random LLaMA with larger weights: its greedy output varies from token to token (the default
    init repeats one token, which would make a token-equality test pass for almost any bug)."""
    model = build_tiny_llama(vocab_size=VOCAB)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.generation_config.eos_token_id = None  # a fixed number of tokens in every call
    return model


def _prompt(batch: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, 8), generator=torch.Generator().manual_seed(1))


def _hf_greedy(model, ids, n=12):
    return model.generate(ids, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("bits,group_size", [(4, 32), (8, -1), (None, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_model_equals_unfused(bits, group_size, dtype):
    base = _lively_tiny()
    model = base if bits is None else qaft.ptq_model(base, bits, group_size)
    plain = prepare_for_inference(copy.deepcopy(model), dtype, "kernel")
    fused = prepare_for_inference(copy.deepcopy(model), dtype, "kernel", fuse=True)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    assert not hasattr(attn, "q_proj") and attn.qkv_sizes == [64, 32, 32] and mlp.gate_up_sizes == [128, 128]
    kernel = {4: Int4Linear, 8: Int8Linear, None: torch.nn.Linear}[bits]
    assert isinstance(attn.qkv_proj, kernel) and isinstance(mlp.gate_up_proj, kernel)
    ids = _prompt(2)
    ref, out = plain(ids).logits.float(), fused(ids).logits.float()
    # Same per-row arithmetic; only the kernels' blocking over a wider output may reorder sums.
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, ref, rtol=0, atol=tol * ref.abs().max().item())
    if dtype == torch.float32:
        assert torch.equal(_hf_greedy(fused, ids[:1]), _hf_greedy(plain, ids[:1]))


def _requantized(layer: QuantizedLinear, group_size: int) -> QuantizedLinear:
    from qaft.methods.layer import float_linear
    from qaft.quant.linear import rtn_quantize_linear
    return rtn_quantize_linear(float_linear(layer.dequantize_weight(), None, torch.float32), layer.bits, group_size)


def test_fusion_skips_mismatched_layers():
    merged = qaft.ptq_model(_lively_tiny(), 4, 32)
    attn = merged.model.layers[0].self_attn
    attn.k_proj = _requantized(attn.k_proj, 64)  # another group size: q/k/v cannot share one layer
    assert fuse_projections(merged) == 3  # the other attention block and both MLPs
    assert hasattr(attn, "q_proj") and not hasattr(attn, "qkv_proj")
    assert hasattr(merged.model.layers[0].mlp, "gate_up_proj")


def _assert_greedy(model, out: torch.Tensor, prompt_len: int) -> None:
    """Each new token is an argmax of the full (cache-free) forward up to bf16 rounding: where bf16 logits
    tie within their precision, the cache layouts (padded static vs dynamic) may legitimately pick either."""
    logits = model(out[:, :-1]).logits.float()[:, prompt_len - 1:]
    chosen = logits.gather(-1, out[:, prompt_len:, None])[..., 0]
    assert (logits.max(-1).values - chosen).max() <= 2e-2 * logits.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_static_cache_loop_equals_hf_generate(dtype):
    model = prepare_for_inference(qaft.ptq_model(_lively_tiny(), 4, 32), dtype, "kernel", fuse=True)
    for batch in (1, 2):
        ids = _prompt(batch)
        ref = _hf_greedy(model, ids)
        assert len(set(ref[0, 8:].tolist())) > 4  # a varied continuation, not one repeated token
        out = greedy_generate(model, ids, 12, compile=False)
        if dtype == torch.float32:
            assert torch.equal(out, ref)
        else:
            _assert_greedy(model, out, ids.shape[1])


def test_loop_stops_at_eos_and_pads_finished_rows():
    model = prepare_for_inference(_lively_tiny(), torch.float32)
    ids = _prompt(2)
    free = greedy_generate(model, ids, 12, compile=False)
    eos = int(free[0, 11])

    def first_eos(row: torch.Tensor) -> int | None:
        hits = (row[8:] == eos).nonzero()
        return 8 + int(hits[0]) if len(hits) else None
    expected, ends = free.clone(), [first_eos(r) for r in free]
    for r, end in enumerate(ends):
        if end is not None:
            expected[r, end + 1:] = eos  # a finished row keeps emitting eos
    length = free.shape[1] if None in ends else max(ends) + 1  # stops once every row is done
    assert torch.equal(greedy_generate(model, ids, 12, compile=False, eos_token_id=eos), expected[:, :length])


def test_compiled_loop_equals_hf_and_falls_back(monkeypatch):
    # Two compiles of tiny fused models (a few seconds each). Alternating them also checks that skipping
    # guard evaluation after the first step never runs one model's graph for the other.
    ids = _prompt()
    models = [prepare_for_inference(qaft.ptq_model(_lively_tiny(), bits, group), torch.float32, "kernel", fuse=True)
              for bits, group in ((4, 32), (8, -1))]
    refs = [_hf_greedy(m, ids) for m in models]
    assert not torch.equal(refs[0], refs[1])
    for model, ref in [*zip(models, refs), *zip(models, refs)]:
        assert torch.equal(greedy_generate(model, ids, 12, compile=True), ref)
        assert decode_mod._STATES[model].compiled
    # inductor's C++ wrapper: the same tokens, its own compiled step
    assert torch.equal(greedy_generate(models[0], ids, 12, compile=True, cpp_wrapper=True), refs[0])
    assert decode_mod._STATES[models[0]].cpp_wrapper
    other = copy.deepcopy(models[0])

    def broken_compile(fn, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")
        return run
    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = greedy_generate(other, ids, 12, compile=True)
    assert torch.equal(out, refs[0])
    assert any("decoding eagerly" in str(w.message) for w in caught)
    assert other in decode_mod._COMPILE_FAILED and not decode_mod._STATES[other].compiled


@pytest.mark.parametrize("symmetric", [False, True])
def test_w8a8_int_mm_layer_equals_the_fake_quantized_model(symmetric):
    """W8A8 through torch._int_mm (exact int32 accumulation) computes what the merged model with its 8-bit
    activation quantizer computes, up to the float rounding of the rescale; the layer quantizes its own input,
    so no pre-hook is carried over to it (which would quantize twice)."""
    from qaft.deploy import Int8x8Linear
    from qaft.methods.act_kv import INPUT

    base = _lively_tiny()
    config = qaft.config_for("ptq", bits=8, group_size=-1, act_bits=8, kv_bits=8, symmetric=symmetric)
    merged = qaft.apply_method(copy.deepcopy(base), config)
    fast = prepare_for_inference(copy.deepcopy(merged), torch.float32, "kernel")
    layers = [m for m in fast.modules() if isinstance(m, Int8x8Linear)]
    assert len(layers) == 14 and not any(hasattr(m, INPUT) for m in layers)
    assert all(hasattr(fast.model.layers[i].self_attn, p) for i in range(2) for p in ("k_proj", "v_proj"))
    assert all(hasattr(fast.model.layers[i].self_attn.k_proj, "output_quantizer") for i in range(2))
    ids = _prompt(2)
    with torch.no_grad():
        ref, out = merged(ids).logits, fast(ids).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4 * ref.abs().max().item())
    dequant = prepare_for_inference(copy.deepcopy(merged), torch.float32, "dequant")
    assert not any(isinstance(m, Int8x8Linear) for m in dequant.modules())
    # auto: int8 x int8 where it measured faster (CPU, half-precision activations), the dense path for fp32
    auto_bf16 = prepare_for_inference(copy.deepcopy(merged), torch.bfloat16, "auto")
    auto_fp32 = prepare_for_inference(copy.deepcopy(merged), torch.float32, "auto")
    assert sum(isinstance(m, Int8x8Linear) for m in auto_bf16.modules()) == 14
    assert not any(isinstance(m, Int8x8Linear) for m in auto_fp32.modules())


@pytest.mark.parametrize("out_features,group_size", [(128, 32), (192, 64), (64, 128)])
def test_int4_prefill_unpacks_the_kernel_layout_exactly(out_features, group_size):
    """Long inputs take the unpack + dense path: the unpacked weight is the layer's dequantized weight (with the
    kernel's bf16 scale and zero), and both paths agree to bf16 rounding."""
    from qaft.deploy.kernels import PREFILL_ROWS
    from qaft.quant.linear import rtn_quantize_linear

    torch.manual_seed(0)
    layer = rtn_quantize_linear(torch.nn.Linear(256, out_features, bias=True), 4, group_size)
    fast = Int4Linear(layer, torch.float32)
    torch.testing.assert_close(fast.dense_weight(), layer.dequantize_weight(), rtol=0, atol=0)
    x = torch.randn(PREFILL_ROWS, 256)
    dense = fast(x)
    kernel = torch.ops.aten._weight_int4pack_mm_for_cpu(x, fast.weight, group_size, fast.scales_and_zeros) + fast.bias
    torch.testing.assert_close(dense, kernel, rtol=0, atol=1e-4 * kernel.abs().max().item())
    bf16 = Int4Linear(layer, torch.bfloat16)
    y_long, y_short = bf16(x.bfloat16()), torch.cat([bf16(x[i:i + 64].bfloat16()) for i in range(0, PREFILL_ROWS, 64)])
    torch.testing.assert_close(y_long.float(), y_short.float(), rtol=0, atol=3e-2 * y_short.float().abs().max().item())

"""The dynamic per-token activation / KV quantizer (METHODS.md, "Activations and the KV cache"): the formula, its
gradient, where it sits in the model, bit-identity when off, checkpoints and bad values."""
import copy
import sys

import pytest
import torch
from torch import nn

import qaft
from qaft.deploy.merged import load_merged, save_merged
from qaft.deploy.packed import load_quantized, read_quantization, save_quantized
from qaft.methods import FLOAT, INTEGER
from qaft.methods.act_kv import INPUT, OUTPUT, install_act_kv
from qaft.quant.activation import (
    PerTokenQuantizer,
    dequantize_per_token,
    fake_quantize_per_token,
    quantize_per_token,
)

from helpers import tiny_llama, token_batch
from method_matrix import applied, calibrated_cases, config, methods


def reference(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM-QAT's formula in float64, written out independently: ``(codes, x_q)`` per last-dim vector."""
    x64 = x.double()
    qmax = 2 ** (bits - 1) - 1
    amax = x64.abs().max(dim=-1, keepdim=True).values
    s = amax / qmax
    codes = torch.where(s > 0, torch.round(x64 / torch.where(s > 0, s, 1.0)), torch.zeros_like(x64))
    return codes, s * codes


def _off_tie(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Entries whose ``x / s`` is not within float32 rounding of a .5 tie (where float32 and float64 may differ)."""
    x64 = x.double()
    s = x64.abs().amax(-1, keepdim=True) / (2 ** (bits - 1) - 1)
    frac = (x64 / torch.where(s > 0, s, 1.0)).abs() % 1
    return (frac - 0.5).abs() > 1e-4


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_quantizer_matches_the_float64_formula(bits, dtype):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(3, 5, 64, generator=g) * torch.logspace(-3, 2, 5)[None, :, None]).to(dtype)
    x[0, 1] = 0  # an all-zero token
    codes, scale = quantize_per_token(x, bits)
    ref_codes, ref_xq = reference(x, bits)
    qmax = 2 ** (bits - 1) - 1
    assert codes.dtype == torch.int8 and scale.shape == (3, 5, 1)
    assert codes.abs().max() == qmax  # the token's largest |x| maps to +-Q, -2^(n-1) is never used
    assert int(codes.min()) >= -qmax
    torch.testing.assert_close(scale.double(), x.double().abs().amax(-1, keepdim=True) / qmax, rtol=1e-6, atol=0)
    keep = _off_tie(x, bits)
    assert torch.equal(codes.double()[keep], ref_codes[keep]) and keep.float().mean() > 0.99
    xq = fake_quantize_per_token(x, bits)
    assert xq.dtype == dtype and torch.isfinite(xq).all()
    assert torch.equal(xq[0, 1], torch.zeros_like(xq[0, 1]))
    tol = {torch.bfloat16: 1e-2, torch.float32: 1e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(xq.double()[keep], ref_xq[keep], rtol=tol, atol=1e-12)
    assert torch.equal(dequantize_per_token(codes, scale, dtype), xq)


def test_all_zero_input_gives_zero_codes_and_no_nan():
    codes, scale = quantize_per_token(torch.zeros(2, 8), 8)
    assert not codes.any() and not scale.any()
    assert torch.equal(fake_quantize_per_token(torch.zeros(2, 8), 4), torch.zeros(2, 8))


def test_gradient_is_straight_through():
    x = torch.randn(4, 32, requires_grad=True)
    upstream = torch.randn(4, 32)
    fake_quantize_per_token(x, 4).backward(upstream)
    assert torch.equal(x.grad, upstream)
    assert not list(PerTokenQuantizer(8).parameters()) and not list(PerTokenQuantizer(8).buffers())


@pytest.mark.parametrize("bits", [1, 9, 0, 17, True, "8"])
def test_bad_bits_raise_one_line(bits):
    with pytest.raises(ValueError, match=r"act_bits must be one of \[2, 3, 4, 5, 6, 7, 8\] or 16 \(off\)"):
        fake_quantize_per_token(torch.ones(2, 4), bits)
    with pytest.raises(ValueError):
        PerTokenQuantizer(16)  # off is the absence of a quantizer


@pytest.mark.parametrize("field, value", [("act_bits", 1), ("act_bits", 9), ("kv_bits", 9), ("kv_bits", 0)])
def test_bad_config_values_raise_at_construction(field, value):
    message = rf"^{field} must be one of \[2, 3, 4, 5, 6, 7, 8\] or 16 \(off\), got {value}$"
    with pytest.raises(ValueError, match=message):
        qaft.config_for("dlqat", **{field: value})


def test_kv_bits_without_kv_projections_raise_before_the_model_changes():
    model = tiny_llama()
    for layer in model.model.layers:  # an architecture whose K and V come from one fused projection
        layer.self_attn.kv_fused = layer.self_attn.k_proj
        del layer.self_attn.k_proj
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"kv_bits=8 quantizes the outputs of \['k_proj', 'v_proj'\] or the K / V "
                                         r"columns of a mapped fused projection \(\['bloom', 'falcon', 'gpt2', "
                                         r"'gpt_neox', 'phi3'\]\), but this 'llama' model has no k_proj module: set "
                                         r"kv_bits=16"):
        qaft.apply_method(model, qaft.config_for("l4q", group_size=32, kv_bits=8, act_bits=8,
                                                 target_modules=("q_proj", "v_proj")))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not qaft.methods.api.qaft_layers(model)
    assert not any(isinstance(m, PerTokenQuantizer) for m in model.modules())


def test_qaft_train_rejects_bad_bits_with_exit_2(tmp_path, monkeypatch, capsys):
    from qaft.training.cli import main

    root = tmp_path / "runs"
    monkeypatch.setattr(sys, "argv", ["qaft-train", "model=tiny-llama", f"runs_root={root}", "method.kv_bits=9"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qaft-train:")]
    assert lines == ["qaft-train: invalid config: kv_bits must be one of [2, 3, 4, 5, 6, 7, 8] or 16 (off), got 9"]
    assert not root.exists()


def _on_grid(t: torch.Tensor, bits: int) -> bool:
    """Whether every token of ``t`` is exactly ``s * q`` with ``s = max|t| / Q`` and integer ``q``."""
    return torch.equal(fake_quantize_per_token(t, bits), t)


def test_kv_quantizer_sits_on_the_k_and_v_projection_outputs_before_rope(monkeypatch):
    """K and V leave k_proj / v_proj on the per-token grid (so before RoPE, which rotates K off it); Q does not."""
    model = qaft.apply_method(tiny_llama(), qaft.config_for("l4q", group_size=32, kv_bits=4))
    outputs, seen = {}, {}
    attn = model.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        getattr(attn, name).register_forward_hook(lambda m, a, out, n=name: outputs.__setitem__(n, out.detach()))
    import transformers.models.llama.modeling_llama as llama

    rope = llama.apply_rotary_pos_emb

    def spy(q, k, *args, **kwargs):  # what attention sees after RoPE
        q_rot, k_rot = rope(q, k, *args, **kwargs)
        seen.setdefault("k_rope", k_rot.detach())
        return q_rot, k_rot

    monkeypatch.setattr(llama, "apply_rotary_pos_emb", spy)
    with torch.no_grad():
        model(token_batch())
    assert _on_grid(outputs["k_proj"], 4) and _on_grid(outputs["v_proj"], 4)
    assert not _on_grid(outputs["q_proj"], 4)
    # Per token over all heads, not per head: the grid of one head's slice alone would differ.
    k_heads = outputs["k_proj"].unflatten(-1, (attn.config.num_key_value_heads, -1))
    assert not _on_grid(k_heads, 4)
    k_rope = seen["k_rope"].transpose(1, 2).flatten(-2)  # [B, T, heads * dim], as k_proj's output
    assert not _on_grid(k_rope[:, 1:], 4)  # RoPE moved it: quantizing after RoPE would put this on the grid


def test_activation_quantizer_sits_at_every_target_input_only():
    model = qaft.apply_method(tiny_llama(), qaft.config_for("qat", group_size=32, act_bits=8))
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, qaft.methods.QaftLinear)):
            module.register_forward_hook(lambda m, a, out, n=name: inputs.__setitem__(n, a[0].detach()))
    with torch.no_grad():
        model(token_batch())
    targets = [n for n in inputs if n in model.qaft_targets.quantized]
    assert len(targets) == 14 and all(_on_grid(inputs[n], 8) for n in targets)
    assert not _on_grid(inputs["lm_head"], 8)  # the head stays float
    assert not any(n.endswith(OUTPUT) for n, _ in model.named_modules())  # kv_bits=16: no KV quantizer


@pytest.mark.parametrize("name", methods(act_kv=True))
def test_sixteen_bits_is_the_weight_only_model_bit_for_bit(name):
    ids = token_batch()
    weight_only = applied(name)
    explicit = applied(name, act_bits=16, kv_bits=16)
    assert weight_only.state_dict().keys() == explicit.state_dict().keys()
    assert not any(isinstance(m, PerTokenQuantizer) for m in explicit.modules())
    with torch.no_grad():
        assert torch.equal(explicit(ids).logits, weight_only(ids).logits)
        assert torch.equal(qaft.merge_model(explicit)(ids).logits, qaft.merge_model(weight_only)(ids).logits)


def test_act_kv_changes_the_forward_but_not_the_state_dict():
    ids = token_batch()
    plain = qaft.apply_method(tiny_llama(), qaft.config_for("dlqat", group_size=32))
    a8kv8 = qaft.apply_method(tiny_llama(), qaft.config_for("dlqat", group_size=32, act_bits=8, kv_bits=8))
    assert plain.state_dict().keys() == a8kv8.state_dict().keys()
    with torch.no_grad():
        assert not torch.equal(plain(ids).logits, a8kv8(ids).logits)


def _merged(name: str) -> nn.Module:
    return qaft.merge_model(applied(name, act_bits=8, kv_bits=8))


@pytest.mark.parametrize("name", methods(merges_to=INTEGER))
def test_packed_checkpoint_records_and_restores_act_kv(name, tmp_path):
    merged = _merged(name)
    save_quantized(merged, tmp_path / "ckpt")
    meta = read_quantization(tmp_path / "ckpt")
    assert meta["version"] == 2 and meta["activations"]["act_bits"] == 8 and meta["activations"]["kv_bits"] == 8
    assert len(meta["activations"]["input_layers"]) == 14 and len(meta["activations"]["output_layers"]) == 4
    loaded = load_quantized(tmp_path / "ckpt")
    assert sum(n.endswith(INPUT) for n, _ in loaded.named_modules()) == 14
    ids = token_batch(seed=4)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, merged(ids).logits)


def test_weight_only_checkpoint_stays_version_1(tmp_path):
    model = qaft.apply_method(tiny_llama(), qaft.config_for("ptq", group_size=32))
    save_quantized(qaft.merge_model(model), tmp_path / "ckpt")
    meta = read_quantization(tmp_path / "ckpt")
    assert meta["version"] == 1 and "activations" not in meta


@pytest.mark.parametrize("name", methods(merges_to=FLOAT))
def test_float_merged_model_keeps_act_kv_through_save_merged_and_ptq(name, tmp_path):
    merged = _merged(name)
    save_merged(merged, tmp_path / "float")
    loaded = load_merged(tmp_path / "float")
    ids = token_batch(seed=4)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=0, atol=0)
    deployed = qaft.ptq_model(merged, bits=4, group_size=32)  # the float methods' deployment keeps them too
    assert sum(n.endswith(INPUT) for n, _ in deployed.named_modules()) == 14
    assert sum(n.endswith(OUTPUT) for n, _ in deployed.named_modules()) == 4


def test_install_is_idempotent():
    model = tiny_llama()
    install_act_kv(model, ["model.layers.0.self_attn.q_proj"], 8, 8)
    install_act_kv(model, ["model.layers.0.self_attn.q_proj"], 4, 4)
    q = model.model.layers[0].self_attn.q_proj
    assert q.input_quantizer.bits == 4 and len(q._forward_pre_hooks) == 1


@pytest.mark.parametrize("name, fields", calibrated_cases())
def test_calibrated_methods_keep_the_quantizers_through_merge(name, fields):
    calibrated = config(name, act_bits=8, kv_bits=8, calib_batches=2, **fields)
    model = qaft.apply_method(tiny_llama(), calibrated, calib_batches=[token_batch(seed=s) for s in (1, 2)])
    merged = qaft.merge_model(model)
    for m in (model, merged):
        assert sum(n.endswith(INPUT) for n, _ in m.named_modules()) == 14
        assert sum(n.endswith(OUTPUT) for n, _ in m.named_modules()) == 4
    ids = token_batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_gguf_export_refuses_a_w_a_kv_model(tmp_path):
    from qaft.deploy.gguf_export import export_gguf

    with pytest.raises(ValueError, match="GGUF export supports weight-only models"):
        export_gguf(_merged("ptq"), tmp_path / "m.gguf")


def test_inference_layers_keep_the_quantizers_and_quantized_blocks_stay_unfused():
    from qaft.deploy.kernels import prepare_for_inference

    fast = prepare_for_inference(_merged("ptq"), backend="dequant", fuse=True)
    assert sum(n.endswith(INPUT) for n, _ in fast.named_modules()) == 14
    assert sum(n.endswith(OUTPUT) for n, _ in fast.named_modules()) == 4
    assert not any(n.endswith(("qkv_proj", "gate_up_proj")) for n, _ in fast.named_modules())

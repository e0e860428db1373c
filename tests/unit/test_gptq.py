"""GPTQ: lower layer-output error than round-to-nearest, RTN in the limit of huge dampening, model-level use."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import qaft  # noqa: E402
from qaft.methods import GPTQOptions, registered  # noqa: E402
from qaft.methods.config import GPTQFields  # noqa: E402
from qaft.methods.gptq_model import gptq_quantize_model  # noqa: E402
from qaft.methods.qalora import QALoRALinear  # noqa: E402
from qaft.quant import dequantize, init_scale_offset, quantize  # noqa: E402
from qaft.quant.gptq import HessianAccumulator, gptq_quantize_weight, layer_output_error  # noqa: E402
from qaft.quant.linear import QuantizedLinear  # noqa: E402

from helpers import tiny_llama, token_batch  # noqa: E402
from method_matrix import calibrated_cases, methods  # noqa: E402


def _correlated_inputs(n: int = 2048, d: int = 128, seed: int = 0) -> torch.Tensor:
    """Inputs with a few dominant, correlated directions and uneven feature scales, as in real activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d**0.5
    x = torch.randn(n, d, generator=g) @ mix + 0.3 * torch.randn(n, d, generator=g)
    return x * torch.linspace(0.1, 3.0, d)


def _rtn(w: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    s, b = init_scale_offset(w, bits, group_size)
    return dequantize(quantize(w, s, b, bits), s, b)


def _hessian(x: torch.Tensor, chunks: int = 3) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1])
    for part in x.chunk(chunks):
        acc.add(part)
    return acc.hessian


def test_hessian_accumulates_the_mean_over_batches():
    x = _correlated_inputs(n=300, d=16)
    expected = 2 * x.double().T @ x.double() / x.shape[0]
    torch.testing.assert_close(_hessian(x, chunks=7), expected)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("act_order", [False, True])
def test_single_layer_error_below_rtn(bits, group_size, act_order):
    x = _correlated_inputs()
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    codes, scale, offset = gptq_quantize_weight(w, _hessian(x), bits, group_size, act_order=act_order)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    n_groups = 1 if group_size == -1 else 128 // group_size
    assert scale.shape == offset.shape == (96, n_groups) and bool((scale > 0).all())
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int(codes.min()) >= lo and int(codes.max()) <= hi
    gptq_err = layer_output_error(x, w, dequantize(codes, scale, offset))
    assert gptq_err < 0.95 * layer_output_error(x, w, _rtn(w, bits, group_size))


def test_huge_dampening_approaches_rtn():
    x, w = _correlated_inputs(), torch.randn(64, 128)
    codes, scale, offset = gptq_quantize_weight(w, _hessian(x), 3, 32, percdamp=1e9)
    s, b = init_scale_offset(w, 3, 32)
    assert (codes == quantize(w, s, b, 3)).float().mean() > 0.999
    torch.testing.assert_close(scale, s)
    rtn_err = layer_output_error(x, w, _rtn(w, 3, 32))
    assert layer_output_error(x, w, dequantize(codes, scale, offset)) == pytest.approx(rtn_err, rel=1e-3)


def test_dead_inputs_and_output_layout_fit_quantized_linear():
    x = _correlated_inputs(d=64)
    x[:, :5] = 0  # inputs that never fire
    w = torch.randn(32, 64)
    codes, scale, offset = gptq_quantize_weight(w, _hessian(x), 4, 16, act_order=True)
    layer = QuantizedLinear(codes, scale, offset, 4)
    torch.testing.assert_close(layer(x), x @ dequantize(codes, scale, offset).T)


def _linear_inputs(model: nn.Module, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inputs of every target linear of the float model on ``batches``."""
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, a, out, n=n: seen.setdefault(n, []).append(a[0].detach()))
             for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in hooks:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in ts]) for n, ts in seen.items()}


@pytest.mark.parametrize("bits,act_order", [(2, False), (3, False), (4, False), (3, True)])
def test_tiny_model_layer_errors_below_rtn(bits, act_order):
    model = tiny_llama()
    calib = [token_batch(seed=i, batch=4, length=32) for i in range(4)]
    inputs = _linear_inputs(model, calib)
    quantized = gptq_quantize_model(model, calib, bits, 32, act_order=act_order)
    rtn = qaft.ptq_model(model, bits, 32)
    gptq_total = rtn_total = 0.0
    for name, x in inputs.items():
        w = model.get_submodule(name).weight
        g = layer_output_error(x, w, quantized.get_submodule(name).dequantize_weight())
        r = layer_output_error(x, w, rtn.get_submodule(name).dequantize_weight())
        if name.startswith("model.layers.0."):  # the first block sees exactly the float inputs
            assert g < r, name
        gptq_total, rtn_total = gptq_total + g, rtn_total + r
    assert gptq_total < rtn_total
    test = token_batch(seed=99, batch=4, length=32)
    with torch.no_grad():
        ref = model(test).logits
        assert (quantized(test).logits - ref).norm() < (rtn(test).logits - ref).norm()


def test_ptq_config_gptq_and_qalora_gptq_base():
    calib = [token_batch(seed=i, batch=2, length=32) for i in range(2)]
    ptq = qaft.config_for("ptq", bits=4, group_size=32, algorithm="gptq", act_order=True)
    assert ptq.calibration_options() == GPTQOptions(act_order=True)
    with pytest.raises(ValueError, match="calibration"):
        qaft.apply_method(tiny_llama(), ptq)
    model = qaft.apply_method(tiny_llama(), ptq, calib_batches=calib)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantizedLinear)
    with pytest.raises(ValueError, match="algorithm"):
        qaft.config_for("ptq", algorithm="awq")

    config = qaft.config_for("qalora", bits=3, group_size=32, rank=4, base_quant="gptq")
    gptq = gptq_quantize_model(tiny_llama(), calib, 3, 32)
    model = qaft.apply_method(tiny_llama(), config, calib_batches=calib)
    layer = model.model.layers[1].self_attn.v_proj
    assert isinstance(layer, QALoRALinear)
    assert torch.equal(layer.codes, gptq.model.layers[1].self_attn.v_proj.codes())
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, QALoRALinear):
                m.lora_B.normal_(std=0.05)
        test = token_batch(seed=5)
        torch.testing.assert_close(qaft.merge_model(model)(test).logits, model(test).logits, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, switch", [(name, switch) for name, switch in calibrated_cases()
                                          if issubclass(registered(name), GPTQFields)])
def test_a_config_that_needs_calibration_says_so_and_carries_the_gptq_options(name, switch):
    fields = {"calib_batches": 3, "act_order": True, "percdamp": 0.05}
    assert qaft.config_for(name, **fields).calibration_options() is None  # RTN: no data needed
    config = qaft.config_for(name, **fields, **switch)
    assert config.calibration_options() == GPTQOptions(**fields)
    assert {"calib_batches", "act_order", "percdamp"} <= set(config.to_dict())
    for other in methods(calibration=False):
        assert qaft.config_for(other).calibration_options() is None, other
    with pytest.raises(ValueError, match="calib_batches must be an integer >= 1, got 0"):
        qaft.config_for(name, calib_batches=0, **switch)
    with pytest.raises(ValueError, match="percdamp must be a number >= 0"):
        qaft.config_for(name, percdamp=-1.0)
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=f"method '{name}' needs calibration data"):
        qaft.apply_method(model, config)
    with pytest.raises(ValueError, match="needs calibration data"):
        config.make_layer(nn.Linear(64, 64))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_calibration_batches_are_ignored_by_methods_that_need_none():
    calib = [token_batch(seed=0, batch=2, length=32)]
    config = qaft.config_for("l4q", group_size=32)
    with_data = qaft.apply_method(tiny_llama(), config, calib_batches=calib)
    plain = qaft.apply_method(tiny_llama(), config)
    test = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(with_data(test).logits, plain(test).logits, rtol=0, atol=0)


def test_padding_tokens_stay_out_of_the_hessians():
    """A right-padded batch with its mask calibrates like the unpadded rows; without the mask the pads count."""
    model, ids, real = tiny_llama(), token_batch(seed=3, batch=2, length=32), 24
    mask = torch.ones_like(ids)
    mask[1, real:] = 0
    padded = ids.clone()
    padded[1, real:] = 0

    def codes(calib: list) -> dict[str, torch.Tensor]:
        quantized = gptq_quantize_model(model, calib, 3, 32)
        return {n: m.codes() for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}

    masked = codes([{"input_ids": padded, "attention_mask": mask}])
    unpadded = codes([ids[:1], ids[1:, :real]])
    unmasked = codes([{"input_ids": padded}])
    for name, c in masked.items():
        # (masked attention may round differently in the last bit: allow a rare code at a rounding boundary)
        assert (c == unpadded[name]).float().mean() >= 0.999, name
        assert (c == unmasked[name]).float().mean() < 0.99, name


def test_integer_zero_point_reaches_gptq_through_the_ptq_config():
    """``ptq`` + ``gptq`` with ``zero_point="int"``: every group of every layer on the integer-zero grid."""
    calib = [token_batch(seed=i, batch=2, length=32) for i in range(2)]
    config = qaft.config_for("ptq", bits=2, group_size=32, algorithm="gptq", zero_point="int")
    model = qaft.apply_method(tiny_llama(), config, calib_batches=calib)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 14
    for layer in layers:
        ratio = layer.offset.double() / layer.scale.double()
        assert bool(((ratio - ratio.round()).abs() < 1e-4).all())
        z = 2 - ratio.round()
        assert bool(((z >= 0) & (z <= 3)).all())
    float_model = qaft.apply_method(tiny_llama(), qaft.config_for("ptq", bits=2, group_size=32, algorithm="gptq"),
                                    calib_batches=calib)
    name = "model.layers.0.mlp.down_proj"
    assert not torch.equal(model.get_submodule(name).offset, float_model.get_submodule(name).offset)


@pytest.mark.parametrize("block_size", [48, 96, 1000])
def test_any_block_size_runs_and_beats_rtn(block_size):
    """Blocks need not be multiples of the group (groups then straddle blocks, read from W as the reference does)."""
    x = _correlated_inputs()
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    codes, scale, offset = gptq_quantize_weight(w, _hessian(x), 3, 32, block_size=block_size)
    assert layer_output_error(x, w, dequantize(codes, scale, offset)) < layer_output_error(x, w, _rtn(w, 3, 32))
    with pytest.raises(ValueError, match="block_size"):
        gptq_quantize_weight(w, _hessian(x), 3, 32, block_size=0)


def test_linears_reading_one_input_share_one_hessian_with_the_same_codes_bit_for_bit(monkeypatch):
    """q/k/v read one tensor, gate/up another: their Hessian is accumulated once (no accumulator is even made for
    the others), and the model is exactly the one that accumulating it per linear gives (with and without a
    padding mask)."""
    from qaft.methods import gptq_model

    model, ids = tiny_llama(), token_batch(seed=3, batch=2, length=32)
    mask = torch.ones_like(ids)
    mask[1, 20:] = 0
    calib = [{"input_ids": ids, "attention_mask": mask}, token_batch(seed=4, batch=2, length=32)]
    owners: dict[str, str] = {}
    owner = gptq_model._Shared.owner

    def recording(self, name: str, x: torch.Tensor) -> str:
        owners[name] = owner(self, name, x)
        return owners[name]

    def tables(quantized) -> dict[str, tuple[torch.Tensor, ...]]:
        return {n: (m.codes(), m.scale, m.offset) for n, m in quantized.named_modules()
                if isinstance(m, QuantizedLinear)}

    made = []
    accumulator = gptq_model.HessianAccumulator

    def counted(in_features: int, device) -> object:
        made.append(in_features)
        return accumulator(in_features, device)

    monkeypatch.setattr(gptq_model._Shared, "owner", recording)
    monkeypatch.setattr(gptq_model, "HessianAccumulator", counted)
    shared = tables(gptq_quantize_model(model, calib, 3, 32))
    assert len(made) == 4 * len(model.model.layers)  # one per distinct input: q/k/v, o, gate/up, down
    assert {n: o for n, o in owners.items() if n != o} == {
        "self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj", "mlp.up_proj": "mlp.gate_proj"}
    monkeypatch.setattr(gptq_model._Shared, "owner", lambda self, name, x: name)  # one accumulator per linear
    alone = tables(gptq_quantize_model(model, calib, 3, 32))
    assert shared.keys() == alone.keys() and len(shared) == 14
    for name, parts in shared.items():
        assert all(torch.equal(a, b) for a, b in zip(parts, alone[name])), name

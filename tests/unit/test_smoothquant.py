"""SmoothQuant (METHODS.md, "Activations and the KV cache"): the smoothing is an exact float identity, ``t`` is the
paper's formula, the smoothed maxima balance, the full PTQ method deploys, bad values fail clearly."""
import copy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import qaft
from qaft.methods import DEFAULT_TARGETS
from qaft.methods.act_kv import INPUT, OUTPUT, install_act_kv
from qaft.methods.smoothquant import (
    SmoothGroup,
    apply_smoothing,
    input_maxima,
    smooth_groups,
    smooth_model,
    smoothing_factors,
    weight_column_max,
)
from qaft.methods.targets import resolve_targets
from qaft.models import tiny_llama_config
from qaft.quant.activation import PerTokenQuantizer
from qaft.quant.linear import QuantizedLinear

from helpers import VOCAB, tiny_llama, token_batch

CALIB = [token_batch(seed=s, batch=2, length=16) for s in (1, 2)]


def _llama(kv_heads: int, seed: int = 0) -> nn.Module:
    """The tiny LLaMA with ``kv_heads`` KV heads (4 = as many as attention heads; 2 = GQA), with uneven norm
    weights and a few outlier channels so that the smoothing factors are far from 1."""
    config = tiny_llama_config(VOCAB)
    config.num_key_value_heads = kv_heads
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).eval()
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight.data = torch.rand(64) * 2 + 0.1
                norm.weight.data[:3] *= 20  # outlier channels, as in real LLM activations
    return model


@pytest.mark.parametrize("kv_heads, smooths_o", [(4, True), (2, False)])
@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
def test_smoothing_is_an_exact_float_identity(kv_heads, smooths_o, alpha):
    model = _llama(kv_heads)
    smoothed = copy.deepcopy(model)
    factors = smooth_model(smoothed, CALIB, alpha)
    assert any(name.endswith("v_proj") for name in factors) == smooths_o
    # the model did change, and not trivially
    changed = smoothed.model.layers[0].input_layernorm.weight / model.model.layers[0].input_layernorm.weight
    assert float((changed - 1).abs().max()) > 0.1
    ids = token_batch(seed=9)
    with torch.no_grad():
        torch.testing.assert_close(smoothed(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)


def test_t_matches_the_paper_formula_on_a_hand_built_layer():
    """One norm feeding two linears; t in float64 written out, with a dead activation and a dead weight column."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, 8, generator=g) * torch.tensor([1, 10, 0.1, 3, 1, 1, 1, 0])  # channel 7 never fires
    w1, w2 = torch.randn(6, 8, generator=g), torch.randn(4, 8, generator=g) * 3
    w1[:, 5] = 0
    w2[:, 5] = 0  # column 5 is read by no weight
    for alpha in (0.25, 0.5, 1.0):
        a = x.double().abs().reshape(-1, 8).max(dim=0).values
        w = torch.cat([w1, w2]).double().abs().max(dim=0).values
        expected = [float(a[j] ** alpha / w[j] ** (1 - alpha)) if a[j] > 0 and w[j] > 0 else 1.0 for j in range(8)]
        t = smoothing_factors(x.abs().reshape(-1, 8).amax(0), weight_column_max([w1, w2]), alpha)
        assert t.dtype == torch.float64
        torch.testing.assert_close(t, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)
        assert t[5] == 1 and t[7] == 1


def test_smoothing_a_hand_built_layer_scales_producer_and_readers():
    """Readers' columns times t; the producer's output channels (norm weight and bias, or linear rows) over t; the
    composed function unchanged."""
    g = torch.Generator().manual_seed(0)
    model = nn.ModuleDict({"norm": nn.LayerNorm(4), "a": nn.Linear(4, 3), "b": nn.Linear(4, 2, bias=False),
                           "up": nn.Linear(3, 4), "down": nn.Linear(4, 2)})
    for p in model.parameters():
        p.data = torch.randn(p.shape, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(5, 4, generator=g)
    t = torch.tensor([1.0, 2.0, 0.5, 4.0], dtype=torch.float64)
    apply_smoothing(model, SmoothGroup("norm", ("a", "b")), t)
    apply_smoothing(model, SmoothGroup("up", ("down",)), t)
    torch.testing.assert_close(model["norm"].weight, before["norm.weight"] / t.float())
    torch.testing.assert_close(model["norm"].bias, before["norm.bias"] / t.float())
    torch.testing.assert_close(model["up"].weight, before["up.weight"] / t.float()[:, None])
    torch.testing.assert_close(model["up"].bias, before["up.bias"] / t.float())
    torch.testing.assert_close(model["down"].weight, before["down.weight"] * t.float())
    torch.testing.assert_close(model["a"].weight, before["a.weight"] * t.float())
    torch.testing.assert_close(model["b"].weight, before["b.weight"] * t.float())
    torch.testing.assert_close(model["a"].bias, before["a.bias"])  # a reader's bias is on its output: untouched
    original = nn.ModuleDict({k: copy.deepcopy(v) for k, v in model.items()})
    original.load_state_dict(before)
    with torch.no_grad():
        for reader in ("a", "b"):
            torch.testing.assert_close(model[reader](model["norm"](x)), original[reader](original["norm"](x)))
        torch.testing.assert_close(model["down"](model["up"](x[:, :3])), original["down"](original["up"](x[:, :3])))


@pytest.mark.parametrize("kv_heads", [4, 2])
@pytest.mark.parametrize("alpha", [0.5, 0.75])
def test_after_smoothing_the_maxima_are_balanced(kv_heads, alpha):
    """max|X_j/t_j|^α == max|W_{:,j} t_j|^(1-α) per channel (for α = 0.5: the two maxima are equal), i.e.
    smoothing the smoothed model again finds t = 1."""
    model = _llama(kv_heads)
    smooth_model(model, CALIB, alpha)
    groups = smooth_groups(model, DEFAULT_TARGETS)
    maxima = input_maxima(model, CALIB, [g.readers[0] for g in groups])
    for group in groups:
        act = maxima[group.readers[0]]
        wmax = weight_column_max([model.get_submodule(r).weight for r in group.readers])
        torch.testing.assert_close(act ** alpha, wmax ** (1 - alpha), rtol=1e-4, atol=0, msg=group.producer)
        if alpha == 0.5:
            torch.testing.assert_close(act, wmax, rtol=1e-4, atol=0, msg=group.producer)
    again = smooth_model(model, CALIB, alpha)
    for t in again.values():
        torch.testing.assert_close(t, torch.ones_like(t), rtol=1e-4, atol=0)


def test_calibration_reads_the_float_activations_and_skips_padding():
    model = _llama(4)
    name = "model.layers.1.self_attn.o_proj"
    plain = input_maxima(model, CALIB, [name])[name]
    install_act_kv(model, [name], 2, 2)  # crude quantizers would change the maxima
    torch.testing.assert_close(input_maxima(model, CALIB, [name])[name], plain, rtol=0, atol=0)
    assert isinstance(getattr(model.get_submodule(name), INPUT), PerTokenQuantizer)  # and they are back
    ids = CALIB[0]
    padded = {"input_ids": torch.cat([ids, torch.zeros(2, 5, dtype=ids.dtype)], 1),
              "attention_mask": torch.cat([torch.ones_like(ids), torch.zeros(2, 5, dtype=ids.dtype)], 1)}
    torch.testing.assert_close(input_maxima(model, [padded], [name])[name],
                               input_maxima(model, [ids], [name])[name], rtol=1e-5, atol=1e-6)


def test_ptq_smoothquant_w8a8kv8_is_integer_per_channel_and_deploys():
    config = qaft.config_for("ptq", algorithm="smoothquant", bits=8, group_size=-1, act_bits=8, kv_bits=8,
                             smooth_alpha=0.5)
    assert config.calibration_options() is not None and config.to_dict()["smooth_alpha"] == 0.5
    model = qaft.apply_method(tiny_llama(), config, calib_batches=CALIB)
    linears = {n: model.get_submodule(n) for n in model.qaft_targets.quantized}
    assert len(linears) == 14
    for name, layer in linears.items():
        assert isinstance(layer, QuantizedLinear) and layer.bits == 8, name
        assert layer.scale.shape == (layer.out_features, 1), name  # per channel
        assert getattr(layer, INPUT).bits == 8
        if name.endswith(("k_proj", "v_proj")):
            assert getattr(layer, OUTPUT).bits == 8
    merged = qaft.merge_model(model)
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
        # W8A8KV8 stays close to the float model (the smoothing itself changes nothing)
        assert float((model(ids).logits - tiny_llama()(ids).logits).abs().max()) < 0.1


def test_smoothing_moves_outliers_out_of_the_activations():
    """The point of it: with outlier channels, W8A8 error of the smoothed model is below plain RTN W8A8's."""
    ids = token_batch(seed=5, length=32)
    with torch.no_grad():
        reference = _llama(4)(ids).logits
    errors = {}
    for algorithm in ("rtn", "smoothquant"):
        config = qaft.config_for("ptq", algorithm=algorithm, bits=8, group_size=-1, act_bits=4, kv_bits=16)
        model = qaft.apply_method(_llama(4), config, calib_batches=CALIB)
        with torch.no_grad():
            errors[algorithm] = float((model(ids).logits - reference).pow(2).mean())
    assert errors["smoothquant"] < errors["rtn"], errors


@pytest.mark.parametrize("alpha", [0, -0.5, 1.5, "half", True, float("nan")])
def test_bad_alpha_raises_one_line(alpha):
    with pytest.raises(ValueError, match=r"^smooth_alpha must be a number in \(0, 1\], got ") as err:
        qaft.config_for("ptq", algorithm="smoothquant", smooth_alpha=alpha)
    assert "\n" not in str(err.value)


def test_missing_calibration_data_raises_as_for_gptq():
    config = qaft.config_for("ptq", algorithm="smoothquant", group_size=32)
    with pytest.raises(ValueError, match="method 'ptq' needs calibration data"):
        qaft.apply_method(tiny_llama(), config)
    with pytest.raises(ValueError, match="algorithm='smoothquant' needs calibration data"):
        config.make_layer(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="needs at least one calibration batch"):
        qaft.apply_method(tiny_llama(), config, calib_batches=[])


def _eval_cfg(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from qaft.evaluation.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="eval", overrides=overrides)


def test_qaft_eval_smoothquant_uses_gptqs_calibration_data():
    """``qaft-eval ptq.algorithm=smoothquant``: the model is SmoothQuant of the float model on exactly the blocks
    GPTQ would calibrate on (ptq.gptq.calib_batches x ptq.calib_seq_len of the train split)."""
    from qaft.evaluation.app import _model
    from qaft.evaluation.runs import calibration_batches
    from qaft.methods.smoothquant import smoothquant_quantize_model
    from qaft.models import load_causal_lm

    cfg = _eval_cfg(["model=tiny-llama", "model.dtype=float32", "ptq.algorithm=smoothquant", "ptq.smooth_alpha=0.7",
                     "ptq.bits=8", "ptq.group_size=-1", "ptq.act_bits=8", "ptq.kv_bits=8",
                     "ptq.gptq.calib_batches=2", "ptq.calib_seq_len=32"])
    model, tokenizer, about = _model(cfg)
    assert about["form"] == "ptq" and about["ptq"]["algorithm"] == "smoothquant"
    q = model.model.layers[0].self_attn.k_proj
    assert isinstance(q, QuantizedLinear) and getattr(q, INPUT).bits == 8 and getattr(q, OUTPUT).bits == 8
    expected, _ = load_causal_lm("tiny-llama", torch.float32)
    install_act_kv(expected, list(resolve_targets(expected, DEFAULT_TARGETS).quantized), 8, 8)
    calib = calibration_batches(tokenizer, "austen", None, 2, 32)
    smoothquant_quantize_model(expected, calib, 8, -1, 0.7, inplace=True)
    ids = token_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected(ids).logits, rtol=0, atol=0)


def test_qaft_eval_rejects_a_bad_smooth_alpha():
    from qaft.evaluation.app import _model

    with pytest.raises(ValueError, match=r"^smooth_alpha must be a number in \(0, 1\], got 2"):
        _model(_eval_cfg(["model=tiny-llama", "ptq.algorithm=smoothquant", "ptq.smooth_alpha=2"]))

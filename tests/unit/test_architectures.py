"""Every decoder-only causal LM transformers ships: the method matrix on ten layouts, every other architecture
through one integer method (or its reviewed refusal), and the README's list generated from the table."""
from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import qaft
from qaft.methods import INTEGER, QaftLinear, QuantizedLinear, traits
from qaft.methods.targets import TargetError, decoder_blocks
from qaft.models.architectures import (
    BUILD,
    MATRIX_ARCHITECTURES,
    NOT_TRIED,
    REFUSED,
    causal_lm_types,
    render_markdown,
    small_model,
    supported,
)

from helpers import ASSERT_NO_QAFT, plain_python, train_steps
from method_matrix import config, methods

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(seed: int = 1, vocab: int = 100) -> torch.Tensor:
    return torch.randint(3, vocab, (2, 8), generator=torch.Generator().manual_seed(seed))


def _train(model: nn.Module, steps: int = 2) -> nn.Module:
    return train_steps(model, _ids(), steps)


def _applied(model: nn.Module, config: qaft.MethodConfig) -> nn.Module:
    """``config`` applied to ``model``; checks that every linear layer of every decoder block (found before the
    method replaced them) is quantized and that no block holds a weight matrix left float."""
    blocks = decoder_blocks(model)
    calib = None if config.calibration_options() is None else [_ids(seed=s) for s in (1, 2)]  # Block-AP's data
    qaft.apply_method(model, config, calib_batches=calib)
    plan = model.qaft_targets
    assert plan.quantized and not plan.unquantizable
    assert all(any(n.startswith(f"{b}.") for b in blocks) for n in plan.quantized)
    assert not [n for n in plan.float_linears if any(n.startswith(f"{b}.") for b in blocks)]
    assert sum(isinstance(m, (QaftLinear, QuantizedLinear)) for m in model.modules()) == len(plan.quantized)
    return model


@pytest.mark.parametrize("name", methods())
@pytest.mark.parametrize("arch", MATRIX_ARCHITECTURES)
def test_method_matrix_on_every_layout(arch, name):
    """Every block linear quantized; the merge computes the trained model (bit for bit where the method says so);
    a state dict reloads into a freshly built model."""
    model = _applied(small_model(arch), config(name))
    fresh = copy.deepcopy(model)  # untrained: what a resume rebuilds before it loads the state dict
    _train(model)
    merged = qaft.merge_model(model)
    ids = _ids(seed=7)
    tol = {"rtol": 0, "atol": 0} if traits(name).bit_exact else {"rtol": 1e-5, "atol": 1e-5}
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        torch.testing.assert_close(merged(input_ids=ids).logits, trained, **tol)
    if traits(name).merges_to == INTEGER:
        assert sum(isinstance(m, QuantizedLinear) for m in merged.modules()) == len(model.qaft_targets.quantized)
    fresh.load_state_dict(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(input_ids=ids).logits, trained, rtol=0, atol=0)


def _quick_check(model_type: str) -> None:
    """One integer method (L4Q, per channel, with its adapter trained a step) with the default targets."""
    model = _applied(small_model(model_type), qaft.config_for("l4q", group_size=-1, rank=2, warmup_steps=0))
    for p in (p for group in qaft.parameter_groups(model).values() for p in group):
        p.data.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    ids = _ids(vocab=100)
    with torch.no_grad():
        merged = qaft.merge_model(model)
        torch.testing.assert_close(merged(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert sum(isinstance(m, QuantizedLinear) for m in merged.modules()) == len(model.qaft_targets.quantized)


def test_the_matrix_architectures_are_supported_and_every_refusal_is_a_causal_lm_type():
    assert set(MATRIX_ARCHITECTURES) <= set(supported()) and set(REFUSED) <= set(causal_lm_types())


# The ten matrix architectures run every method above; every other type runs one.
@pytest.mark.parametrize("model_type", [t for t in causal_lm_types() if t not in MATRIX_ARCHITECTURES])
def test_every_causal_lm_architecture_passes_or_is_refused_for_its_stated_reason(model_type):
    refusal = REFUSED.get(model_type)
    if refusal is None:
        _quick_check(model_type)
    elif refusal.stage == NOT_TRIED:
        pytest.skip(refusal.reason)
    elif refusal.stage == BUILD:  # transformers itself cannot build / run it from the small config
        with pytest.raises(Exception):  # noqa: B017 - transformers' own error, whatever it is
            small_model(model_type)(input_ids=_ids())
    else:
        with pytest.raises(TargetError, match="would stay float"):
            qaft.apply_method(small_model(model_type), qaft.config_for("l4q", group_size=-1))


def test_readme_lists_the_architectures_of_the_table():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- architectures:begin -->\n(.*?)<!-- architectures:end -->", readme, re.DOTALL)
    assert found is not None and found.group(1) == render_markdown()


# One fresh interpreter for every architecture (without qaft: transformers + torchao only).
_LOAD_ALL = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1], weights_only=True)
for folder in sys.argv[2:]:
    with torch.no_grad():
        torch.save(AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits, folder + "/logits.pt")
""" + ASSERT_NO_QAFT
HF_EXPORTED = ("llama", "qwen3", "phi3", "gemma2", "opt", "gpt_neox")


def test_format_hf_exports_load_in_transformers_alone(tmp_path):
    from qaft.deploy.hf_export import export_hf

    ids = _ids(seed=5)
    torch.save(ids, tmp_path / "ids.pt")
    refs = {}
    for arch in HF_EXPORTED:
        merged = qaft.merge_model(qaft.apply_method(small_model(arch), qaft.config_for("ptq", group_size=32)))
        with torch.no_grad():
            refs[arch] = merged(input_ids=ids).logits
        export_hf(merged, tmp_path / arch)
    done = plain_python("-c", _LOAD_ALL, str(tmp_path / "ids.pt"), *(str(tmp_path / a) for a in HF_EXPORTED))
    assert done.returncode == 0, done.stderr[-3000:]
    for arch, ref in refs.items():
        out = torch.load(tmp_path / arch / "logits.pt", weights_only=True)
        # (q - z) s against s q + b: float32 rounding of the weights (tests/unit/test_hf_export.py)
        assert (out - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), arch


@pytest.mark.parametrize("arch, first, kind", [("gpt2", "transformer.h.0.attn.c_attn", "Conv1D"),
                                               ("falcon", "transformer.h.0.self_attention.query_key_value",
                                                "FalconLinear")])
def test_format_hf_refuses_layers_torchao_does_not_run_in_one_line(tmp_path, arch, first, kind):
    from qaft.deploy.hf_export import export_hf

    merged = qaft.merge_model(qaft.apply_method(small_model(arch), qaft.config_for("ptq", group_size=32)))
    with pytest.raises(ValueError, match=rf"^format=hf: {re.escape(first)} \(and \d+ more\) is a {kind} in "
                                         rf"'{arch}', .* use format=qaft"):
        export_hf(merged, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()

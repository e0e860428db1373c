"""``qaft-export format=hf``: transformers alone (a process that never imports qaft) loads the exported folder and
computes the merged model's logits; a ``format=qaft`` folder is refused by transformers with a clear message."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import qaft
from qaft.deploy.cli import main as export_main
from qaft.deploy.hf_export import export_hf
from qaft.models import load_causal_lm

from helpers import ASSERT_NO_QAFT, fake_run_folder, plain_python

# Runs in a fresh interpreter without qaft on the path: transformers + torchao only.
LOAD_WITHOUT_QAFT = """
import json, sys, torch
from transformers import AutoModelForCausalLM
folder, ids_path = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder).eval()  # the folder's own dtype
with torch.no_grad():
    logits = model(torch.load(ids_path, weights_only=True)).logits.float()
torch.save(logits, folder + "/logits.pt")
print(type(model.model.layers[0].self_attn.q_proj.weight).__name__)
""" + ASSERT_NO_QAFT


def _merged(name: str, **fields) -> torch.nn.Module:
    base, _ = load_causal_lm("tiny-llama")
    return qaft.merge_model(qaft.apply_method(base, qaft.config_for(name, **fields))).eval()


CASES = {
    "ptq-w4g32-float-zero": ("ptq", {"bits": 4, "group_size": 32}),
    "ptq-w3g64-int-zero": ("ptq", {"bits": 3, "group_size": 64, "zero_point": "int"}),
    "qalora-w3g32": ("qalora", {"bits": 3, "group_size": 32, "rank": 4}),  # fractional offsets at 3 bits
    "ptq-w2g32": ("ptq", {"bits": 2, "group_size": 32}),
    "ptq-w8-per-channel": ("ptq", {"bits": 8, "group_size": -1}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_alone_computes_the_merged_models_logits(tmp_path, case):
    name, fields = CASES[case]
    merged = _merged(name, **fields)
    if name == "qalora":  # move the offsets off the integer grid, as training does
        for layer in merged.modules():
            if isinstance(layer, qaft.methods.QuantizedLinear):
                layer.offset += 0.37 * layer.scale
    ids = torch.randint(100, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = merged(ids).logits
    torch.save(ids, tmp_path / "ids.pt")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):  # bf16: a few bf16 ulps of the logits
        folder = tmp_path / str(dtype)
        _, zeros = export_hf(copy.deepcopy(merged), folder, dtype=dtype)
        assert set(zeros.values()) == {fields.get("zero_point") == "int"}
        done = plain_python("-c", LOAD_WITHOUT_QAFT, str(folder), str(tmp_path / "ids.pt"))
        assert done.returncode == 0, done.stderr[-2000:]
        assert "IntxUnpackedToInt8Tensor" in done.stdout
        err = (torch.load(folder / "logits.pt", weights_only=True) - ref).abs().max().item()
        assert err <= tol * max(1.0, ref.abs().max().item()), (dtype, err)


def test_export_refuses_activation_quantization_in_one_line(tmp_path):
    merged = _merged("ptq", bits=8, group_size=-1, act_bits=8)
    with pytest.raises(ValueError, match=r"^format=hf: the model quantizes activations/KV cache \(act_bits=8"):
        export_hf(merged, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    fake_run_folder(tmp_path / "run", merged)
    assert export_main([str(tmp_path / "run"), "format=hf"]) == 2
    assert not (tmp_path / "run" / "export_hf").exists()


@pytest.mark.parametrize("kind", ["integer", "float"])
def test_qaft_export_format_hf_on_a_run_folder(tmp_path, kind, capsys):
    base, _ = load_causal_lm("tiny-llama")
    if kind == "integer":
        fake_run_folder(tmp_path / "run", _merged("l4q", bits=4, group_size=32, rank=4))
    else:  # a float merge: exported as the run deployed it, RTN at config.yaml's w4 g32
        lora = qaft.merge_model(qaft.apply_method(base, qaft.config_for("lora", rank=4)))
        fake_run_folder(tmp_path / "run", lora)
    assert export_main([str(tmp_path / "run"), "format=hf"]) == 0
    out = capsys.readouterr().out
    assert "14 integer layers as torchao IntxUnpackedToInt8Tensor" in out
    folder = tmp_path / "run" / "export_hf"
    config = json.loads((folder / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "torchao"
    assert config["quantization_config"]["modules_to_not_convert"] == ["lm_head"]
    assert (folder / "tokenizer_config.json").is_file()


def test_plain_transformers_refuses_a_qaft_folder_clearly(tmp_path):
    """A ``format=qaft`` folder: qaft loads it; transformers fails with a message that names the way out."""
    from qaft.deploy import load_quantized, save_quantized

    merged = _merged("ptq", bits=4, group_size=32)
    save_quantized(merged, tmp_path / "q")
    ids = torch.randint(0, 1000, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_quantized(tmp_path / "q")(ids).logits, merged(ids).logits)
    code = "import sys; from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])"
    done = plain_python("-c", code, str(tmp_path / "q"))
    assert done.returncode != 0
    assert "qaft-packed (a qaft packed integer model, not a transformers format" in done.stderr
    assert "qaft-export RUN format=hf" in done.stderr

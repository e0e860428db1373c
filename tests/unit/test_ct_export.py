"""``qaft-export format=compressed-tensors``: transformers alone (a process that never imports qaft) loads the
exported folder and computes the merged model's logits; the integer zero point survives every integer merge the
traits say keeps it, and exports exactly; float offsets are refused with their measured error, or written
approximately with it; W-A-KV models and float merges that were never deployed are refused in one line."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import qaft
from qaft.deploy.cli import main as export_main
from qaft.deploy.ct_export import export_compressed_tensors, is_exact, probe_ids
from qaft.methods import INTEGER, QuantizedLinear, traits

from helpers import ASSERT_NO_QAFT, fake_run_folder, move_trainables, plain_python, tiny_llama, token_batch
from method_matrix import applied, int_zero_fields, methods

# Runs in a fresh interpreter without qaft on the path: transformers + compressed-tensors only.
LOAD_WITHOUT_QAFT = """
import sys, torch
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1], weights_only=True)
for folder in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.save(model(ids).logits.float(), folder + "/logits.pt")
""" + ASSERT_NO_QAFT


def _trained(name: str, seed: int = 0, **fields) -> torch.nn.Module:
    """The method applied (example config and ``fields``) with every trainable tensor moved, as training would."""
    return qaft.merge_model(move_trainables(applied(name, **fields), seed)).eval()


def _int_zero(name: str, **extra) -> dict:
    return int_zero_fields(name, group_size=32, zero_point="int", **extra)


INTEGER_ZERO = methods(merges_to=INTEGER, zero_point=True)  # every integer method that takes zero_point=int


@pytest.mark.parametrize("name", INTEGER_ZERO + methods(symmetric_grid=True))
def test_the_traits_say_which_integer_merges_export_exactly(name, tmp_path):
    """``zero_point=int`` (or a symmetric grid) survives the merge unless the trait ``offsets_move`` says otherwise;
    where it does, compressed-tensors' own decompressor reads back qaft's weights from the export."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    merged = _trained(name, **(_int_zero(name) if traits(name).zero_point else {}))
    layers = {n: m for n, m in merged.named_modules() if isinstance(m, QuantizedLinear)}
    assert all(is_exact(m) for m in layers.values()) == (not traits(name).offsets_move)
    if traits(name).offsets_move:
        return
    folder, meta = export_compressed_tensors(merged, tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    scheme = QuantizationScheme.model_validate(config["config_groups"]["group_0"])
    tensors = load_file(str(folder / "model.safetensors"))
    for layer_name, layer in layers.items():
        state = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == layer_name}
        weight = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
        torch.testing.assert_close(weight, layer.dequantize_weight(), rtol=0, atol=1e-6)
    assert meta["exact"] and meta["symmetric"] == traits(name).symmetric_grid


def test_transformers_alone_computes_the_merged_models_logits(tmp_path):
    """One interpreter without qaft loads every case: L4Q with integer zero points through qaft-export on a run
    folder, DL-QAT at 3 bits, LLM-QAT's symmetric 8-bit channels, and L4Q's float offsets written approximately,
    whose logits differ from qaft's by the error its metadata states."""
    cases = {"l4q-w4g32-int": _trained("l4q", **_int_zero("l4q", rank=4)),
             "dlqat-w3g32-int": _trained("dlqat", **_int_zero("dlqat", bits=3)),
             "llm_qat-w8-channel": _trained("llm_qat", bits=8),
             "l4q-w4g32-float-approx": _trained("l4q", group_size=32)}
    ids = probe_ids(cases["l4q-w4g32-int"].config.vocab_size)
    torch.save(ids, tmp_path / "ids.pt")
    fake_run_folder(tmp_path / "run", cases["l4q-w4g32-int"])
    assert export_main([str(tmp_path / "run"), "format=compressed-tensors"]) == 0
    folders = {"l4q-w4g32-int": tmp_path / "run" / "export_ct"}
    for case in list(cases)[1:]:
        folders[case] = export_compressed_tensors(cases[case], tmp_path / case, approximate="approx" in case)[0]
    done = plain_python("-c", LOAD_WITHOUT_QAFT, str(tmp_path / "ids.pt"), *map(str, folders.values()))
    assert done.returncode == 0, done.stderr[-3000:]
    for case, folder in folders.items():
        with torch.no_grad():
            ref = cases[case](ids).logits
        logits = torch.load(folder / "logits.pt", weights_only=True)
        meta = json.loads((folder / "qaft_export.json").read_text())
        if meta["exact"]:
            assert (logits - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item()), case
        else:  # the error the metadata states is the one transformers computes
            stated = meta["approximation"]["logit_error"]["relative_rms"]
            assert stated > 1e-3 and float((logits - ref).norm() / ref.norm()) == pytest.approx(stated, rel=1e-3)


def test_float_offsets_are_refused_with_the_measured_error(tmp_path, capsys):
    fake_run_folder(tmp_path / "run", _trained("l4q", group_size=32))
    assert export_main([str(tmp_path / "run"), "format=compressed-tensors"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("qaft-export: format=compressed-tensors: 14 of 14 integer layers have float offsets")
    assert "relative RMS" in err and "approximate=true" in err and "method.zero_point=int" in err
    assert not (tmp_path / "run" / "export_ct").exists()


def test_activation_quantization_and_undeployed_float_merges_are_refused(tmp_path, capsys):
    fake_run_folder(tmp_path / "wakv", qaft.merge_model(applied("ptq", bits=8, group_size=-1, act_bits=8)))
    assert export_main([str(tmp_path / "wakv"), "format=compressed-tensors"]) == 2
    assert "quantizes activations/KV cache (act_bits=8, kv_bits=16)" in capsys.readouterr().err
    lora = qaft.merge_model(applied("lora", rank=4))
    fake_run_folder(tmp_path / "float", lora)
    record = json.loads((tmp_path / "float" / "record.json").read_text())
    del record["bits"], record["group_size"]  # a float merge whose deployed (+PTQ) form cannot be rebuilt
    (tmp_path / "float" / "record.json").write_text(json.dumps(record))
    assert export_main([str(tmp_path / "float"), "format=compressed-tensors"]) == 2
    assert "cannot be rebuilt" in capsys.readouterr().err
    assert not (tmp_path / "wakv" / "export_ct").exists() and not (tmp_path / "float" / "export_ct").exists()
    with pytest.raises(ValueError, match="holds no integer layers"):
        export_compressed_tensors(lora, tmp_path / "ct")


def test_logits_in_process_equal_for_a_gptq_model_on_the_integer_grid(tmp_path):
    """GPTQ (calibrated) on the integer grid: exact too (read back in this process, transformers' loader)."""
    from transformers import AutoModelForCausalLM

    config = qaft.config_for("ptq", bits=4, group_size=32, algorithm="gptq", zero_point="int", calib_batches=2)
    model = qaft.apply_method(tiny_llama(), config, calib_batches=[token_batch(seed=s, length=32) for s in range(2)])
    merged = qaft.merge_model(model).eval()
    folder, meta = export_compressed_tensors(merged, tmp_path / "ct")
    assert meta["exact"] and not meta["symmetric"]
    loaded = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = token_batch(seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, merged(ids).logits, rtol=0, atol=1e-4)


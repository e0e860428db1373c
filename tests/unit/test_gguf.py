"""GGUF export: exact Q4_1 blocks, and transformers' own GGUF loader reading the file without qaft."""
import importlib.util

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import qaft
from qaft.deploy.gguf_export import export_gguf, q4_1_bytes, q4_1_exact, rope_permutation
from qaft.models import build_tiny_llama, load_causal_lm, load_tokenizer
from qaft.quant.linear import rtn_quantize_linear


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_q4_1_blocks_reproduce_the_layer_to_fp16(group_size):
    torch.manual_seed(group_size)
    layer = rtn_quantize_linear(torch.nn.Linear(256, 24), 4, group_size)
    assert q4_1_exact(layer)
    blocks = q4_1_bytes(layer)
    assert blocks.shape == (24, 256 // 32 * 20) and blocks.dtype == np.uint8
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    ref = layer.dequantize_weight().numpy()
    # d and m are fp16: the only error is their rounding (relative 2^-11 of d*15 + |m|).
    np.testing.assert_allclose(w, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    s16 = layer.scale.half().float().repeat_interleave(group_size, 1)
    m16 = (layer.offset - 8 * layer.scale).half().float().repeat_interleave(group_size, 1)
    exact = s16 * (layer.codes().float() + 8) + m16  # what Q4_1 must hold, bit for bit up to fp32 math
    np.testing.assert_allclose(w, exact.numpy(), rtol=1e-6, atol=1e-7)


def test_other_layouts_are_not_q4_1():
    lin = torch.nn.Linear(64, 8)
    assert not q4_1_exact(rtn_quantize_linear(lin, 3, 32))
    assert not q4_1_exact(rtn_quantize_linear(lin, 4, 16))
    with pytest.raises(ValueError, match="no exact GGUF type"):
        export_gguf(qaft.ptq_model(build_tiny_llama(), 3, 32), "/tmp/never.gguf")


def test_rope_permutation_is_undone_by_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    permuted = w[rope_permutation(64, 4)]
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted, 4, 4)
    np.testing.assert_array_equal(back, w)


def _round_trip(model, tokenizer, tmp_path, seq=24):
    merged = qaft.ptq_model(model, 4, 64 if model.config.hidden_size % 64 == 0 else 32)
    export_gguf(merged, tmp_path / "model.gguf")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="model.gguf", dtype=torch.float32)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune"
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :seq]
    gguf_tok = AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="model.gguf")
    assert gguf_tok(text).input_ids == tokenizer(text).input_ids
    with torch.no_grad():
        ref, out = merged(ids).logits, loaded(ids).logits
    return ref, out


def test_transformers_loads_exported_tiny_llama(tmp_path):
    ref, out = _round_trip(build_tiny_llama(), load_tokenizer("tiny-llama"), tmp_path)
    # fp16 d, m and F16 embeddings: fp16-level agreement of the logits.
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-3 * ref.abs().max().item())


@pytest.mark.slow
def test_transformers_loads_exported_smollm2(tmp_path):
    model, tok = load_causal_lm("smollm2-135m")
    ref, out = _round_trip(model, tok, tmp_path)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_reads_export_like_qaft(tmp_path):
    import llama_cpp
    model, tok = load_causal_lm("smollm2-135m")
    merged = qaft.ptq_model(model, 4, 32)
    export_gguf(merged, tmp_path / "m.gguf")
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=256, logits_all=True, verbose=False)
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be"
    ids = tok(text).input_ids
    assert llm.tokenize(text.encode(), add_bos=False) == ids  # the exported vocabulary tokenizes alike
    llm.eval(ids)
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0]
    # Teacher-forced next-token predictions of llama.cpp agree with the merged model's: 19 of 20 with
    # llama-cpp-python 0.3.36. Not all: Q4_1 d/m and embeddings are fp16, and llama.cpp's CPU kernels round
    # the activations to 8 bits for their Q4_1 dot products, so near-ties may flip.
    agree = (torch.from_numpy(np.asarray(llm.scores[:len(ids)])).argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.85
    out = llm("The capital of France is", max_tokens=8, temperature=0.0)
    llm.close()  # now: its finalizer fails at interpreter exit
    assert "Paris" in out["choices"][0]["text"]

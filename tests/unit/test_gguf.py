"""GGUF export: exact Q4_1 blocks, refusal with a measured error elsewhere, and tiny random llama / mistral / qwen2
models read back by transformers' own GGUF loader (model and tokenizer) without qaft."""
import importlib.util

import gguf
import numpy as np
import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import qaft
from qaft.deploy.gguf_export import (
    ERROR_KEY,
    affine_blocks,
    approximation_report,
    exact_gguf_type,
    export_gguf,
    rope_permutation,
)
from qaft.models import build_tiny_llama, load_causal_lm, load_tokenizer
from qaft.quant.linear import rtn_quantize_linear
from tests.helpers import fake_run_folder

TEXT = "It is a truth universally acknowledged, in 1811, that a single man — café owner — <|im_start|>user\n"
ARCHES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (MistralConfig, MistralForCausalLM),
          "qwen2": (Qwen2Config, Qwen2ForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}


def tiny_model(arch: str) -> torch.nn.Module:
    """A random two-layer model of ``arch`` with SmolLM2's vocabulary (and nonzero qwen2 q/k/v biases)."""
    config_cls, model_cls = ARCHES[arch]
    config = config_cls(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        rms_norm_eps=1e-5, tie_word_embeddings=arch != "mistral", rope_theta=5e4,
                        # transformers' GGUF reader takes qwen3's head_dim from Qwen3Config's default (128, as in every
                        # real Qwen3), not from the file's attention.key_length, which qaft writes (llama.cpp reads it)
                        head_dim=128 if arch == "qwen3" else 16)
    if arch == "mistral":
        config.sliding_window = 128
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = model_cls(config).eval()
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.data.normal_(0, 0.5)  # HF initialises them to 0, which would test nothing
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                p.data.normal_(1, 0.3)  # and these to 1
    return model


@pytest.mark.parametrize("bits,group_size", [(4, 32), (4, 64), (4, 128), (3, 64), (2, 32)])
def test_q4_1_blocks_reproduce_the_layer_to_fp16(bits, group_size):
    torch.manual_seed(group_size + bits)
    layer = rtn_quantize_linear(torch.nn.Linear(256, 24), bits, group_size)
    assert exact_gguf_type(layer) == gguf.GGMLQuantizationType.Q4_1
    blocks = affine_blocks(layer)
    assert blocks.shape == (24, 256 // 32 * 20) and blocks.dtype == np.uint8
    w = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_1)
    ref = layer.dequantize_weight().numpy()
    # d and m are fp16: the only error is their rounding (relative 2^-11 of d*15 + |m|).
    np.testing.assert_allclose(w, ref, rtol=0, atol=2e-3 * np.abs(ref).max())
    half = 2 ** (bits - 1)
    s16 = layer.scale.half().float().repeat_interleave(group_size, 1)
    m16 = (layer.offset - half * layer.scale).half().float().repeat_interleave(group_size, 1)
    exact = s16 * (layer.codes().float() + half) + m16  # what Q4_1 must hold, bit for bit up to fp32 math
    np.testing.assert_allclose(w, exact.numpy(), rtol=1e-6, atol=1e-7)


def test_other_layouts_are_refused_with_the_closest_type_and_its_error():
    lin = torch.nn.Linear(64, 8)
    assert exact_gguf_type(rtn_quantize_linear(lin, 8, 32)) is None
    assert exact_gguf_type(rtn_quantize_linear(lin, 4, 16)) is None
    tok = load_tokenizer("tiny-llama")
    with pytest.raises(ValueError, match=r"8-bit groups of 32 .* closest: Q8_0 \(relative weight error \d"):
        export_gguf(qaft.ptq_model(build_tiny_llama(), 8, 32), "/tmp/never.gguf", tok)
    with pytest.raises(ValueError, match=r"4-bit groups of 16 .* closest: Q4_1 \(relative weight error \d"):
        export_gguf(qaft.ptq_model(build_tiny_llama(), 4, 16), "/tmp/never.gguf", tok)
    gpt2_like = build_tiny_llama()
    gpt2_like.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="architectures"):
        export_gguf(gpt2_like, "/tmp/never.gguf", tok)


def test_approximate_export_states_the_error_it_wrote(tmp_path):
    merged = qaft.ptq_model(build_tiny_llama(), 4, 16)
    line, error = approximation_report(merged)
    export_gguf(merged, tmp_path / "m.gguf", load_tokenizer("tiny-llama"), approximate=True)
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert float(reader.fields[ERROR_KEY].contents()) == pytest.approx(error, rel=1e-6)
    # the stated error is the file's: read the Q4_1 tensors back, undo the q/k row order, compare with qaft
    by_name = {t.name: t for t in reader.tensors}
    err = ref = 0.0
    for i, layer in enumerate(merged.model.layers):
        for gguf_name, hf in (("attn_q", layer.self_attn.q_proj), ("attn_k", layer.self_attn.k_proj),
                              ("ffn_down", layer.mlp.down_proj)):
            t = by_name[f"blk.{i}.{gguf_name}.weight"]
            assert t.tensor_type == gguf.GGMLQuantizationType.Q4_1
            w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(hf.out_features, hf.in_features)
            heads = {"attn_q": 4, "attn_k": 2}.get(gguf_name)
            if heads:
                w = w[np.argsort(rope_permutation(w.shape[0], heads))]
            target = hf.dequantize_weight().numpy()
            err, ref = err + ((w - target) ** 2).sum(), ref + (target ** 2).sum()
    assert 0.5 * error < (err / ref) ** 0.5 < 2 * error  # a subset of the layers: same order of magnitude
    assert error > 1e-2  # 4-bit g16 re-blocked into g32 is a real approximation, not fp16 noise


def test_rope_permutation_is_undone_by_transformers():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor
    w = np.arange(64 * 3, dtype=np.float32).reshape(64, 3)
    permuted = w[rope_permutation(64, 4)]
    back = LlamaTensorProcessor()._reverse_permute_weights(permuted, 4, 4)
    np.testing.assert_array_equal(back, w)


def _round_trip(merged, tokenizer, folder, path, **kw):
    loaded = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=path.name, dtype=torch.float32)
    gguf_tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=path.name)
    assert gguf_tok(TEXT).input_ids == tokenizer(TEXT).input_ids
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        return merged(ids).logits, loaded(ids).logits, loaded


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2", "qwen3"])
def test_transformers_loads_exported_tiny_model(tmp_path, arch):
    tok = load_tokenizer("tiny-llama")
    merged = qaft.ptq_model(tiny_model(arch), 4, 32)
    path = export_gguf(merged, tmp_path / "model.gguf", tok)
    ref, out, loaded = _round_trip(merged, tok, tmp_path, path)
    # Q4_1 d, m and the F16 embeddings / norms-free matrices are fp16: fp16-level agreement of the logits
    # (measured max |diff| / max |logit|: 0.0006-0.0011 over the three architectures).
    torch.testing.assert_close(out, ref, rtol=0, atol=5e-3 * ref.abs().max().item())
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    meta = gguf.GGUFReader(str(path)).fields
    arch_name = "llama" if arch == "mistral" else arch  # llama.cpp's converter writes Mistral as llama
    assert meta["general.architecture"].contents() == arch_name
    # Mistral's window caps the context: within it, windowed and full attention are the same function.
    assert meta[f"{arch_name}.context_length"].contents() == (128 if arch == "mistral" else 256)
    assert loaded.config.rope_parameters["rope_theta"] == 5e4
    assert loaded.config.tie_word_embeddings == (arch != "mistral")


def test_qaft_export_cli_writes_gguf_from_a_run_folder(tmp_path):
    from qaft.deploy.cli import main
    float_model = build_tiny_llama()
    fake_run_folder(tmp_path / "run", qaft.ptq_model(float_model, 4, 32), float_model)
    assert main([str(tmp_path / "run"), "format=gguf", "out=" + str(tmp_path / "m.gguf")]) == 0
    assert gguf.GGUFReader(str(tmp_path / "m.gguf")).fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert main([str(tmp_path / "run"), "format=gguf", "approximate=maybe"]) == 2


@pytest.mark.slow
def test_transformers_loads_exported_smollm2(tmp_path):
    model, tok = load_causal_lm("smollm2-135m")
    merged = qaft.ptq_model(model, 4, 64)
    path = export_gguf(merged, tmp_path / "model.gguf", tok)
    ref, out, _ = _round_trip(merged, tok, tmp_path, path)
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * ref.abs().max().item())
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


needs_llama_cpp = pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                                     reason="llama-cpp-python not installed")


@needs_llama_cpp
@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_llama_cpp_reads_tiny_export_like_qaft(tmp_path, arch):
    import llama_cpp
    tok = load_tokenizer("tiny-llama")
    merged = qaft.ptq_model(tiny_model(arch), 4, 32)
    export_gguf(merged, tmp_path / "m.gguf", tok)
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), n_ctx=64, logits_all=True, verbose=False)
    text = TEXT.replace("<|im_start|>", "")  # llama.cpp parses special tokens in text only when asked
    ids = tok(text).input_ids
    assert llm.tokenize(text.encode(), add_bos=False) == ids
    llm.eval(ids)
    with torch.no_grad():
        ref = merged(torch.tensor([ids])).logits[0]
    out = torch.from_numpy(np.asarray(llm.scores[:len(ids)]))
    llm.close()
    # llama.cpp's CPU Q4_1 dot products round the activations to 8 bits: max |diff| / max |logit| measured
    # 0.0046 (llama), 0.0067 (mistral), 0.0057 (qwen2) with llama-cpp-python 0.3.36
    torch.testing.assert_close(out, ref, rtol=0, atol=2e-2 * ref.abs().max().item())


@needs_llama_cpp
def test_llama_cpp_reads_export_like_qaft(tmp_path):
    import llama_cpp
    model, tok = load_causal_lm("smollm2-135m")
    merged = qaft.ptq_model(model, 4, 32)
    export_gguf(merged, tmp_path / "m.gguf", tok)
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

